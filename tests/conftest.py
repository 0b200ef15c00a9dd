"""Shared test set-up: eight fake CPU devices for the sharded paths, a shared compile cache, CPU-sized
PyTorch for the reference side."""

import atexit
import gc
import os
import shutil
import tempfile

from compile_flags import BASE_FLAGS

# Must precede the first `import jax`: the sharding tests split batches over these devices.
os.environ["XLA_FLAGS"] = " ".join(
    [*BASE_FLAGS, os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from jdiff.app.batch_generation import enable_compilation_cache  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(2)

# Many tests build the same tiny train steps again (each `train_lib.train` call jits a new closure,
# which JAX's in-memory cache cannot match); the persistent cache matches them by their program.
# A fresh folder per session, so nothing carries over between runs. (Crashes once blamed on writing
# entries at LLVM level 0 came from running out of memory mappings; see compile_flags.py.)
# Under pytest-xdist the controlling process makes the folder before it starts the workers, which
# inherit it through the environment: workers share programs, and only the controller removes it.
if "PYTEST_XDIST_WORKER" in os.environ and os.environ.get("JDIFF_TEST_COMPILE_CACHE"):
    _COMPILE_CACHE = os.environ["JDIFF_TEST_COMPILE_CACHE"]
else:
    _COMPILE_CACHE = tempfile.mkdtemp(prefix="jdiff-test-compile-cache-")
    atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
    os.environ["JDIFF_TEST_COMPILE_CACHE"] = _COMPILE_CACHE  # for workers and the subprocesses tests start
enable_compilation_cache(_COMPILE_CACHE)


def _memory_map_count() -> int:
    """How many memory mappings this process holds (0 where /proc is missing)."""
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return 0


_peak_maps_after_module = [0]


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Free every compiled program once a test file is done.

    XLA:CPU maps each loaded executable's code in several memory mappings, and JAX's jit caches keep
    executables alive for as long as their function lives. Over the whole suite the process reached
    Linux's default limit of 65530 mappings (`vm.max_map_count`) after about 300 tests, and the next
    mmap inside XLA failed: CI crashed with SIGSEGV or SIGABRT in `executable.serialize()` or in
    compiling, never in a test run alone. Clearing the caches between files keeps the count to what
    one file needs; the persistent compile cache makes recompiling a program another file shares
    cheap.
    """
    yield
    jax.clear_caches()
    gc.collect()
    _peak_maps_after_module[0] = max(_peak_maps_after_module[0], _memory_map_count())


def pytest_sessionfinish(session):
    """Under pytest-xdist, a worker hands its highest count to the controlling process."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["peak_maps_after_module"] = _peak_maps_after_module[0]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The controlling process's side of the hand-over (an xdist hook: only called under xdist)."""
    count = getattr(node, "workeroutput", {}).get("peak_maps_after_module", 0)
    _peak_maps_after_module[0] = max(_peak_maps_after_module[0], count)


def pytest_terminal_summary(terminalreporter):
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            maximum = limit.read().strip()
    except OSError:
        maximum = "unknown"
    terminalreporter.write_line(
        f"memory mappings after a test file, at most: {_peak_maps_after_module[0]} "
        f"(vm.max_map_count {maximum})")


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
