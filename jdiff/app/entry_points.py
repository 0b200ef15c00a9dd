"""The installed commands. `jdiff-train` needs the `[train]` extras, which a generation-only install
(`pip install jdiff-diffusion`) lacks: say so instead of showing an import traceback."""

import sys


def train() -> None:
    try:
        from jdiff.app import train_cli
    except ModuleNotFoundError as error:
        sys.exit(f"jdiff-train needs {error.name!r}, one of the training dependencies: "
                 "pip install 'jdiff-diffusion[train]'")
    train_cli.run()


def sample() -> None:
    from jdiff.app import sample_cli

    sample_cli.run()
