"""A fake `gs://` for tests: objects kept in a local folder, reached through epath and fsspec exactly
as a real bucket is (epath routes `gs://` to fsspec's "gcs" filesystem when TensorFlow is absent),
and with an object store's limits: renaming or appending fails, so any code that relies on them on a
user's path fails here as it would on GCS.

Orbax reaches GCS by two other roads, which the fixture points at the same folder: tensorstore
writes arrays through its own GCS driver (here its local file driver), and Orbax asks GCS's API
whether a bucket has a hierarchical namespace (here: no).
"""

import contextlib
import os

import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import register_implementation


class ObjectStoreViolation(AssertionError):
    """Raised for an operation a real object store cannot do."""


class FakeGcsFileSystem(DirFileSystem):
    protocol = ("gs", "gcs")
    root = None  # the local folder holding the buckets, set by `fake_gcs`

    def __init__(self, *args, **kwargs):  # epath passes GCS options (finalize_on_close=...)
        if FakeGcsFileSystem.root is None:
            raise RuntimeError("the fake gs:// is only available inside the fake_gcs fixture")
        super().__init__(path=FakeGcsFileSystem.root, fs=LocalFileSystem())

    def _strip_protocol(self, path):
        path = super()._strip_protocol(path)
        return path.removeprefix("gs://").removeprefix("gcs://") if isinstance(path, str) else path

    def mv(self, *args, **kwargs):
        raise ObjectStoreViolation(f"rename on an object store (cannot be atomic there): {args}")

    rename = move = mv

    def open(self, path, mode="rb", *args, **kwargs):
        if "a" in mode or "+" in mode:
            raise ObjectStoreViolation(f"an object store cannot append to or update {path} (mode {mode!r})")
        return super().open(path, mode, *args, **kwargs)


def local_path(url: str) -> str:
    """The local file behind a fake gs:// URL."""
    return os.path.join(FakeGcsFileSystem.root, url.removeprefix("gs://"))


@contextlib.contextmanager
def fake_gcs_store(root: str):
    from etils.epath import backend
    from orbax.checkpoint._src.path import gcs_utils

    FakeGcsFileSystem.root = str(root)
    FakeGcsFileSystem.clear_instance_cache()
    register_implementation("gs", FakeGcsFileSystem, clobber=True)
    register_implementation("gcs", FakeGcsFileSystem, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    patch = pytest.MonkeyPatch()
    patch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda path: {"driver": "file", "path": local_path(path)})
    patch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    try:
        yield "gs://bucket"
    finally:
        patch.undo()
        backend.fsspec_backend._get_filesystem.cache_clear()
        FakeGcsFileSystem.root = None
