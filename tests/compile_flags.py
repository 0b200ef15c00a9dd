"""XLA flags every test process runs with, the pytest process and the subprocesses tests start.

None beyond XLA's defaults. `--xla_backend_optimization_level=0` (LLVM unoptimised) cut the tiny
models' compile time by about a third (the cached-latents test 173 -> 109 s), but with it XLA:CPU
(jax 0.10.2) crashed the pytest process with segmentation faults in three of four full-suite runs:
twice in `executable.serialize()` writing a persistent-cache entry, once compiling a sharded train
step, each time after 250-300 other tests, never in a test run alone. The suite ran at the default
level in every CI run since the project began without a crash, so the tests are back there.

The default level then crashed too (SIGABRT in `executable.serialize()`, train_test, after ~340 tests):
the cause was never the flag but the process running out of memory mappings (`vm.max_map_count`),
which conftest's `release_compiled_programs` now prevents. The level stays at the default: the flag
is worth re-measuring now that the crashes are explained.
"""

BASE_FLAGS: tuple[str, ...] = ()


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a subprocess: the base flags plus `flags` (e.g. a fake device count)."""
    return " ".join(BASE_FLAGS + flags)
