"""A digest of jdiff's own source, for the keys of the caches kept across processes (parameter
shapes, compiled programs): an entry written by other code must never be read back."""

import functools
import hashlib
from pathlib import Path

_JDIFF = Path(__file__).resolve().parent


@functools.cache
def source_digest(under: str = "") -> str:
    """sha256 over the names and contents of every .py file under `jdiff/<under>`."""
    digest = hashlib.sha256()
    for path in sorted((_JDIFF / under).rglob("*.py")):
        digest.update(str(path.relative_to(_JDIFF)).encode() + path.read_bytes())
    return digest.hexdigest()
