"""Error types that jdiff raises for bad user input, so callers can catch them precisely."""


class ConfigError(ValueError):
    """A model or run configuration holds an unknown field or an unsupported value."""


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt, or disagrees with its config."""
