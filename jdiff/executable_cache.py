"""Compiled programs kept on disk, so that a new process skips tracing, lowering and compiling.

JAX's persistent compilation cache saves the XLA compile, but a new process still traces the whole
sampling program in Python and lowers it to find its cache entry: on the small bench model, about
1.5 s of a warm `sample.py` process's 4.5 s to the first image. With `enable(folder)`, `call` keeps
each program it compiles as a serialised executable (jax.experimental.serialize_executable, what
maxdiffusion does for its time to ready) under a digest of everything that shapes it: the static
description the caller gives, the arguments' tree, shapes, dtypes and shardings, the devices, the
jax and jaxlib versions, XLA_FLAGS and jdiff's own source. A later process with the same digest loads
the executable and runs it. An entry that cannot be read, loaded or run is compiled again and
replaced. The programs written are compiled around JAX's persistent cache (one it hands back
serialises incompletely).

Off unless enabled (`sample.py --compile-cache DIR` enables it under DIR/executables).
"""

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jaxlib

from jdiff import paths
from jdiff.source_digest import source_digest

_folder: Optional[Path] = None
_loaded: dict = {}  # digest -> loaded executable, for later calls in this process
stats = {"compiled": 0, "read": 0}  # programs this process compiled and wrote, and read from disk


def enable(folder) -> None:
    global _folder
    _folder = Path(folder)


def disable() -> None:
    global _folder
    _folder = None
    _loaded.clear()


def _leaf(x) -> Any:
    if isinstance(x, jax.Array):  # the devices too: a program is compiled for the devices it runs on
        return [list(x.shape), str(x.dtype), repr(x.sharding), sorted(d.id for d in x.sharding.device_set), x.weak_type]
    return repr(x)


def digest(description: Any, args: tuple) -> str:
    devices = jax.devices()
    described = dict(
        description=description, tree=str(jax.tree.structure(args)), leaves=[_leaf(x) for x in jax.tree.leaves(args)],
        devices=[len(devices), devices[0].platform, devices[0].device_kind, jax.process_count()],
        versions=[jax.__version__, jaxlib.__version__], xla_flags=os.environ.get("XLA_FLAGS", ""), source=source_digest())
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()


def _devices(compiled) -> list[int]:
    """The ids of the devices a program runs on, in its order (the first input's sharding)."""
    sharding = jax.tree.leaves(compiled.input_shardings)[0]
    devices = sharding.mesh.devices.flat if hasattr(sharding, "mesh") else sorted(sharding.device_set, key=lambda d: d.id)
    return [d.id for d in devices]


def _read(path: Path):
    from jax.experimental import serialize_executable

    try:
        with open(path, "rb") as f:
            (payload, in_tree, out_tree), device_ids = pickle.load(f)
        by_id = {d.id: d for d in jax.devices()}
        # Without the devices it was compiled for, a program would be loaded for every device.
        return serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                         execution_devices=[by_id[i] for i in device_ids])
    except Exception:  # missing, truncated, or from a jaxlib that cannot load it: compile again
        return None


def _write(path: Path, compiled) -> None:
    from jax.experimental import serialize_executable

    try:
        payload = pickle.dumps((serialize_executable.serialize(compiled), _devices(compiled)))
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.write_file(path, lambda tmp: Path(tmp).write_bytes(payload), shared=True)
    except Exception:  # a backend that cannot serialise, a full disk: only the next process is slower
        pass


def call(jitted: Callable, args: tuple, static: dict, describe: Callable[[], Any]):
    """jitted(*args, **static), through the on-disk executables when enabled. `describe()`: JSON-able
    text naming everything in `static` that changes the program (the static values themselves need
    not be stable across processes)."""
    if _folder is None:
        return jitted(*args, **static)
    key = digest(describe(), args)
    if key in _loaded:
        return _loaded[key](*args)
    path = _folder / f"{key}.jaxexe"
    compiled = _read(path)
    if compiled is not None:
        try:  # its first run shows whether the file held a whole program (the results are needed anyway)
            result = jax.block_until_ready(compiled(*args))
            stats["read"] += 1
            _loaded[key] = compiled
            return result
        except jax.errors.JaxRuntimeError as e:  # a program this jaxlib cannot run: compile it again
            logging.warning("jdiff: the compiled program in %s did not run (%s); compiling it again.", path, e)
    compiled = _compile(jitted, args, static)
    _write(path, compiled)
    stats["compiled"] += 1
    _loaded[key] = compiled
    return compiled(*args)


def _compile(jitted: Callable, args: tuple, static: dict):
    """A fresh compile, around JAX's caches: an executable loaded from JAX's persistent cache
    serialises without its kernels (jaxlib 0.10.2 on CPU: "Function ... not found" when the copy
    runs), so it must not be the one written.
    - JAX decides once per process whether the persistent cache is used, so switching it off takes
      `reset_cache` (public, in jax.experimental.compilation_cache) before and after.
    - JAX keeps the executable of an earlier jit call in memory, keyed on the program and its compiler
      options, so the compile sets one option (to its default value: the program is unchanged) to
      miss that entry."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        return jitted.lower(*args, **static).compile(compiler_options={"xla_embed_ir_in_executable": False})
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()
