"""One process of the two-process test (tests/multiprocess_test.py), or the one-process reference.

    python tests/multiprocess_worker.py WORKDIR DATA_DIR OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]

Runs the tiny recipe in two invocations (the first stops after 2 diffusion steps and saves, the
second restores and finishes), or in one with STRAIGHT=1 in the environment (the reference, whose
resume is tested elsewhere), then samples fixed prompts; process 0 writes the images and the
exported weights to OUT.npz. XLA_FLAGS must give each process its fake CPU devices.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from jdiff import distributed  # noqa: E402

if len(sys.argv) > 4:
    distributed.initialize(sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))

import os  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

if os.environ.get("JDIFF_TEST_COMPILE_CACHE"):  # the second recipe.run reuses the first one's programs
    process = sys.argv[6] if len(sys.argv) > 6 else "0"  # a folder per process: no concurrent writers
    folder = Path(os.environ["JDIFF_TEST_COMPILE_CACHE"]) / f"worker-{Path(sys.argv[1]).name}-{process}"
    from jdiff.app.batch_generation import enable_compilation_cache

    enable_compilation_cache(folder)

import jdiff  # noqa: E402
from jdiff.configs import tiny  # noqa: E402
from jdiff import sharding  # noqa: E402
from jdiff.app import recipe  # noqa: E402


def main(workdir: str, data_dir: str, out: str) -> None:
    config = tiny.get_config()
    config.data.data_dir = data_dir
    config.diffusion_train.update(steps=4, checkpoint_every=2, log_every=1, batch_size=8)
    config.vae_train.update(steps=2, checkpoint_every=2, log_every=1)
    # One sampling program serves the grid and the evaluation: same batch, both guided.
    config.sample.update(num_prompts=4, guidance=3.0)
    config.evaluate.update(num_prompts=4, batch_size=4, guidances=(3.0,))
    if os.environ.get("STRAIGHT") != "1":
        config.diffusion_train.run_steps = 2
        first = recipe.run(config, workdir)
        assert "stopped_early" in first, first
        config.diffusion_train.run_steps = 0
    recipe.run(config, workdir)  # (restores step 2 and) trains to step 4
    pipe = jdiff.load_pipeline(workdir)
    prompts = ["a small red circle at the top left", "a large blue square at the center"] * 4
    images = jdiff.generate(pipe, prompts, sampler="dpm++2m", steps=3, guidance=3.0, seed=7)
    weights = {"/".join(str(k.key) for k in path): np.asarray(v)
               for path, v in jax.tree_util.tree_flatten_with_path(sharding.gather(pipe.params))[0]}
    if distributed.is_main():
        np.savez(out, images=images, devices=jax.device_count(), processes=jax.process_count(), **weights)


if __name__ == "__main__":
    main(*sys.argv[1:4])
