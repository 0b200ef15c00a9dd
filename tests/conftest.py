"""Shared test set-up: eight fake CPU devices for the sharded paths, CPU-sized PyTorch for the
reference side."""

import os
import tempfile

# Must precede the first `import jax`: the sharding tests split batches over these devices.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from jdiff.app.batch_generation import enable_compilation_cache  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(2)

# Many tests build the same tiny train steps again (each `train_lib.train` call jits a new closure,
# which JAX's in-memory cache cannot match); the persistent cache matches them by their program.
# A fresh folder per session, so nothing carries over between runs.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="jdiff-test-compile-cache-")
enable_compilation_cache(_COMPILE_CACHE)
os.environ["JDIFF_TEST_COMPILE_CACHE"] = _COMPILE_CACHE  # for the subprocesses tests start


@pytest.fixture
def one_device():
    """A `data` mesh of one device: the unsharded baseline (and faster for tiny batches)."""
    return Mesh(jax.devices()[:1], ("data",))


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """`tiny_models.make_tiny_sd_pipeline`'s default checkpoint (seed 0), written once for every test
    file that reads it. Read only: a test that changes files copies it first."""
    from tiny_models import make_tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("shared") / "tiny_sd"
    make_tiny_sd_pipeline(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """`tiny_models.make_tiny_sdxl_pipeline`'s default base checkpoint, written once. Read only."""
    from tiny_models import make_tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("shared") / "tiny_sdxl"
    make_tiny_sdxl_pipeline(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_shapes_dir(tmp_path_factory):
    """The tiny config's shapes set (32 px, 64 train and 16 test examples, seed 0) as a data_dir,
    built once. Read only."""
    from jdiff.app.shapes_tfds import load_shapes

    folder = tmp_path_factory.mktemp("shared_shapes")
    for split in ("train", "test"):
        load_shapes(folder, split, num_train=64, num_test=16)
    return folder
