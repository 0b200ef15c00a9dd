"""A disk cache of the parameter shapes a module's config implies.

Loading a checkpoint needs the tree of parameter shapes its config implies (to place and check every
tensor), which `jax.eval_shape` of the module's `init` gives by tracing the whole model: about a
second and a half of a new `sample.py` process on a CPU, a third of its time to the first image.
The tree depends only on the module's class, its config and dtypes, the example inputs, and jdiff's
model code, so it is kept under a digest of all of them in `$JDIFF_CACHE` (default
`~/.cache/jdiff`) and read back by later processes. A cache that cannot be written or read (a
read-only home, a damaged file) is only slower: the shapes are traced again.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import traverse_util

from jdiff import paths
from jdiff.source_digest import source_digest

_VERSION = 1  # of the file format


def cache_dir() -> Path:
    return Path(os.environ.get("JDIFF_CACHE") or Path.home() / ".cache" / "jdiff") / "param_shapes"


def key(module, inputs) -> str:
    described = dict(
        version=_VERSION, source=source_digest("models"),  # a change to the model code may change a tree
        module=f"{type(module).__module__}.{type(module).__qualname__}",
        config=module.config.to_dict(),
        dtypes=[str(getattr(module, name, None)) for name in ("dtype", "param_dtype")],
        inputs=[(tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") else repr(x) for x in jax.tree.leaves(inputs)])
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _read(path: Path):
    try:
        flat = json.loads(path.read_text())
        return traverse_util.unflatten_dict(
            {tuple(k.split("/")): jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in flat.items()})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _write(path: Path, tree) -> None:
    flat = {"/".join(k): [list(v.shape), str(v.dtype)] for k, v in traverse_util.flatten_dict(tree).items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.write_file(path, lambda tmp: Path(tmp).write_text(json.dumps(flat)), shared=True)
    except OSError:
        pass


def param_shapes(module, inputs, trace: Callable):
    """`trace()`'s tree of jax.ShapeDtypeStruct for `module` called on `inputs`, from the cache when
    an earlier process traced the same."""
    path = cache_dir() / f"{key(module, inputs)}.json"
    found = _read(path)
    if found is None:
        found = trace()
        _write(path, found)
    return found
