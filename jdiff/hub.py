"""Hugging Face repo ids ("org/name") resolved from the local Hugging Face cache, offline: jdiff
never downloads, but reads what `hf download` (or diffusers/transformers) already put there."""

import re

from jdiff import paths
from jdiff.errors import CheckpointError
from jdiff.paths import Path

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve(source, *, revision: str | None = None, cache_dir=None) -> Path:
    """`source` itself when it exists (on disk or in an object store: `gs://...`); otherwise, when it reads as a repo id, the folder of
    that repo's snapshot (at `revision`: a branch, tag or commit; default main) in the Hugging Face
    cache (`cache_dir`, default $HF_HUB_CACHE or ~/.cache/huggingface/hub)."""
    path = paths.as_path(source)
    if not paths.is_local(path) or path.exists() or not _REPO_ID.fullmatch(str(source)):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source), revision=revision, cache_dir=cache_dir, local_files_only=True))
    except HFValidationError:  # not a valid repo id after all: an ordinary missing path
        return path
    except LocalEntryNotFoundError:
        where = cache_dir or constants.HF_HUB_CACHE
        at = f" at revision {revision!r}" if revision else ""
        fetch = f"hf download {source}" + (f" --revision {revision}" if revision else "")
        raise CheckpointError(
            f"{str(source)!r} is not a folder, and the Hugging Face cache ({where}) holds no snapshot of that "
            f"repo{at}. jdiff reads the cache offline: download it first (`{fetch}` on a machine with network "
            f"access, into the same cache), or pass the folder the model is in.") from None
