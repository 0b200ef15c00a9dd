"""Train latent diffusion. With no arguments: both stages on the embedded captioned-shapes set, then a
sample grid and the prompt-adherence evaluation, all under ./workdir/shapes.

    python train.py                        (in a checkout; `jdiff-train` once installed)
    python train.py --config jdiff/configs/tiny.py --workdir /tmp/run
    python train.py --config.diffusion_train.steps=5000 --config.diffusion.prediction_type=v_prediction

Several hosts: run the same command on each (a TPU VM pod slice or SLURM is detected; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID).
"""

import json
import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jdiff import configs, distributed
from jdiff.app import huge_pages, recipe, xla_flags
from jdiff.errors import CheckpointError, ConfigError, TrainingError
from jdiff.preemption import Preempted

# The default config ships inside the package, so the installed entry point finds it outside a checkout.
_CONFIG = config_flags.DEFINE_config_file("config", str(Path(configs.__file__).parent / "default.py"),
                                          "an ml_collections config file (get_config())", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/shapes", "checkpoints, logs, samples and the exported model")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: how many processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
    # XLA reads its flags when the first backend starts, which has not happened yet.
    xla_flags.use_cpu_flags(remat=_CONFIG.value.remat)
    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        results = recipe.run(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Preempted as stopped:  # SIGTERM or SIGINT: saved; a rerun resumes
        print(stopped, file=sys.stderr)
        return stopped.exit_code
    if jax.process_index() == 0:
        if results:
            print(json.dumps(results, indent=2))
        print(f"done: model in {_WORKDIR.value}/pipeline, samples in {_WORKDIR.value}/samples")
    return 0


def run() -> None:
    """The `jdiff-train` entry point (and `python train.py`)."""
    huge_pages.restart_with_huge_pages()  # glibc reads its tunables only at process start
    app.run(main)


if __name__ == "__main__":
    run()
