"""One path type for every user path (workdirs, data, model folders, LoRA files, sample outputs):
`etils.epath`, the type Orbax and TFDS use, so `gs://bucket/run` goes wherever a local folder does.

Object stores have no rename and no append: an object appears whole once its upload completes, and
"moving" a folder copies every object. So jdiff writes a file in one piece (a local file under a
temporary name then renamed; an object in one upload), replaces a folder by writing its marker file
last (`replace_folder`), and gives readers that need a real file (safetensors' memory map,
transformers' tokenizers) a temporary local copy (`local_copy`).

`gs://` needs gcsfs (or tensorflow) installed, as epath does; other fsspec stores (`s3://`, ...)
work for everything except Orbax's checkpoints, whose arrays tensorstore writes to local paths and
`gs://` only.
"""

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Iterator

from etils import epath

from jdiff.errors import CheckpointError

Path = epath.Path
PathLike = epath.PathLike

_CHUNK = 16 << 20  # bytes per read/write when streaming between a local file and an object


def as_path(path: PathLike) -> epath.Path:
    return path if isinstance(path, epath.Path) else epath.Path(path)


def is_local(path: PathLike) -> bool:
    """False for a URL of an object store (`gs://...`, `s3://...`): no rename, no append there."""
    return "://" not in os.fspath(path)


def write_file(path: PathLike, write: Callable[[str], None], shared: bool = False) -> None:
    """Calls `write(local_file_name)` and puts the result at `path` in one piece: a reader sees the
    old file or the new one, never half (a local file is renamed into place; an object is uploaded
    from a local temporary copy and appears when the upload completes). `shared`: other processes
    may write the same file at once (a cache), so each writes under a name of its own."""
    path = as_path(path)
    local = is_local(path)
    if local and shared:
        tmp = os.fspath(path.with_name(f".{path.name}.{os.getpid()}.partial"))
    elif local:  # a fixed name: a rerun's write replaces what a killed one left
        tmp = os.fspath(temporary_name(path))
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.")
        os.close(fd)
    try:
        write(tmp)
        if local:
            os.replace(tmp, path)
        else:
            with open(tmp, "rb") as source, path.open("wb") as target:
                shutil.copyfileobj(source, target, _CHUNK)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def temporary_name(path: PathLike) -> epath.Path:
    """Where `write_file` writes a local file before renaming it to `path`."""
    path = as_path(path)
    return path.with_name(f".{path.name}.partial")


def read_json(path: PathLike, error: type[Exception] = CheckpointError, missing: str = "is missing") -> dict:
    """A JSON file's contents; a missing or malformed file raises `error` naming it (`missing`: what
    to say when it does not exist)."""
    path = as_path(path)
    if not path.is_file():
        raise error(f"{str(path)!r} {missing}.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{str(path)!r} is not valid JSON: {e}") from None


def write_bytes(path: PathLike, data: bytes) -> None:
    """`data` at `path` in one piece (as `write_file`)."""
    path = as_path(path)
    if not is_local(path):
        path.write_bytes(data)  # one upload: the object appears whole or not at all
        return
    write_file(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[pathlib.Path]:
    """A local file or folder with `path`'s contents: `path` itself when it is local, else a
    temporary download, removed on exit."""
    path = as_path(path)
    if is_local(path):
        yield pathlib.Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="jdiff-") as tmp:
        target = pathlib.Path(tmp) / path.name
        _download(path, target)
        yield target


def _download(source: epath.Path, target: pathlib.Path) -> None:
    if source.is_dir():
        target.mkdir()
        for child in source.iterdir():
            _download(child, target / child.name)
    else:
        with source.open("rb") as reader, open(target, "wb") as writer:
            shutil.copyfileobj(reader, writer, _CHUNK)


def visible_files(folder: PathLike) -> Iterator[epath.Path]:
    """Every file under `folder`, at any depth, skipping names that start with "." (epath has no
    rglob on object stores, and its walk there yields paths without the store's prefix)."""
    for child in as_path(folder).iterdir():
        if child.name.startswith("."):
            continue
        if child.is_dir():
            yield from visible_files(child)
        else:
            yield child


def copy_tree(source: PathLike, target: PathLike) -> None:
    """Copies a folder file by file, between any two stores."""
    source, target = as_path(source), as_path(target)
    target.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        if child.is_dir():
            copy_tree(child, target / child.name)
        else:
            with child.open("rb") as reader, (target / child.name).open("wb") as writer:
                shutil.copyfileobj(reader, writer, _CHUNK)


def unused_name(folder: PathLike, name: str) -> epath.Path:
    """folder/name, or folder/name.1, name.2, ... : the first that does not exist."""
    folder = as_path(folder)
    candidate, n = folder / name, 0
    while candidate.exists():
        n += 1
        candidate = folder / f"{name}.{n}"
    return candidate


def move_tree(source: PathLike, target: PathLike) -> None:
    """Moves a folder to a name that does not exist yet: a rename on a local disk; on an object
    store, a copy and then the removal of the original (interrupted, the original stays whole)."""
    source, target = as_path(source), as_path(target)
    if is_local(source) and is_local(target):
        source.rename(target)
        return
    copy_tree(source, target)
    source.rmtree()


def replace_folder(folder: PathLike, write: Callable[[epath.Path], None]) -> None:
    """Writes a folder with `write(staging_folder)`, so that an interruption never leaves a
    half-written folder under the final name that looks whole.

    Local: written beside the target and swapped in by renames. Object store (no rename): the old
    folder is removed first and the new one written in place, and `write` must write the file that
    marks the folder complete (a pipeline's model_index.json) last."""
    folder = as_path(folder)
    if not is_local(folder):
        folder.rmtree(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        write(folder)
        return
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    previous = folder.with_name(folder.name + ".previous")
    if folder.exists():
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
    partial.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)
