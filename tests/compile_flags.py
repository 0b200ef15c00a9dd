"""XLA flags every test process runs with, the pytest process and the subprocesses tests start.

`--xla_backend_optimization_level=0`: LLVM does not optimise the generated CPU code. The tests' tiny
models spend far longer compiling than running, and this cuts compile time by about a third (six
model files: 124 -> 101 s in one process). An earlier attempt was dropped after XLA:CPU crashed in
full-suite runs; the crashes came from the process running out of memory mappings
(`vm.max_map_count`), not from the flag, and conftest's `release_compiled_programs` prevents them.
The suite ran 404 tests at this level with no crash (2 xdist workers, 18.5 min here).

The parity tests pass within their tolerances at either level; train.py and benchmarks run at XLA's
default level.
"""

BASE_FLAGS: tuple[str, ...] = ("--xla_backend_optimization_level=0",)


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a subprocess: the base flags plus `flags` (e.g. a fake device count)."""
    return " ".join(BASE_FLAGS + flags)
