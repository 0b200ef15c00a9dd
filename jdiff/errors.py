"""Error types that jdiff raises for bad user input, so callers can catch them precisely."""


class ConfigError(ValueError):
    """A model or run configuration holds an unknown field or an unsupported value."""


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt, or disagrees with its config."""


class TrainingError(RuntimeError):
    """Training cannot go on: the loss became NaN or infinite, or a resumed run does not fit its
    checkpoint. The message names the step and the last good checkpoint."""
