"""sample.py's output folder: numbered PNGs, a manifest of them, a record of the run that wrote them,
and a grid of the first images.

A rerun of the same command keeps every batch whose images are all on disk and generates the rest.
Batches are fixed by the job list and the batch size, so each regenerated batch holds the same
images with the same padding as in an uninterrupted run, and its PNGs come out byte-identical. The
record (`run.json`) stops a different command from mixing its images into the folder.
"""

import hashlib
import json
import re

from PIL import Image

from jdiff import image_io, paths
from jdiff.errors import ConfigError
from jdiff.paths import Path

RECORD = "run.json"
MANIFEST = "manifest.jsonl"
GRID = "grid.png"
GRID_IMAGES = 64  # the grid shows the first images only: memory stays bounded however many there are


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def run_record(model: str, jobs, batch_size: int, settings: dict) -> dict:
    """What must match for a rerun to continue a folder: the model, every job, the batch size (it
    decides which images share a batch, and so their exact pixels) and the settings."""
    # sizes and other encoders' prompts only where given: older folders still resume
    listing = [[j.prompt, j.negative_prompt, j.seed] + ([j.height, j.width] if j.height or j.width else [])
               + ([dict(j.encoder_prompts)] if j.encoder_prompts else []) for j in jobs]
    listing = json.dumps(listing, ensure_ascii=False)
    record = {"model": str(model), "images": len(jobs), "jobs_sha256": hashlib.sha256(listing.encode()).hexdigest(),
              "batch_size": batch_size, "settings": settings}
    return json.loads(json.dumps(record, default=str, ensure_ascii=False))  # as the file will read back


_IMAGE_FILE = re.compile(r"\.?(\d{5,})\.png(\.partial)?")  # image_name(i), and its temporary name while written


def _own_files(out: Path, count: int):
    """The files a run of `count` images writes: never anything else a user keeps in the folder
    (a photo named 20240101.png included, unless a run had that many images)."""
    names = {name for own in (RECORD, MANIFEST, GRID) for name in (own, paths.temporary_name(out / own).name)}
    for path in out.iterdir():
        match = _IMAGE_FILE.fullmatch(path.name)
        if path.is_file() and (path.name in names or match and int(match[1]) < count):
            yield path


def prepare(out: Path, record: dict, overwrite: bool) -> None:
    """Makes `out` ready for the run `record` describes: removes an earlier run's files with
    `overwrite`, else refuses a folder written by a different command."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        earlier = _read_record(out) or {}
        for path in _own_files(out, max(record["images"], int(earlier.get("images", 0)))):
            path.unlink()
    else:
        images = any(_IMAGE_FILE.fullmatch(p.name) for p in out.iterdir() if p.is_file())
        earlier = _read_record(out) if images else record  # no images yet: an earlier attempt that
        if earlier is None:                                 # failed early holds nothing to keep
            raise ConfigError(f"{out} holds images that no readable run record ({RECORD}) describes; pass "
                              f"--overwrite to replace them, or choose another --out.")
        if earlier != record:
            changed = sorted(k for k in record.keys() | earlier.keys() if record.get(k) != earlier.get(k))
            raise ConfigError(f"{out} holds images of a different run (it differs in {', '.join(changed)}); "
                              f"pass --overwrite to replace them, or choose another --out.")
    paths.write_text(out / RECORD, json.dumps(record, indent=1, ensure_ascii=False))


def _read_record(out: Path) -> dict | None:
    try:
        record = json.loads((out / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def kept_entries(out: Path, indices) -> list[dict] | None:
    """The manifest entries of a batch whose images are all on disk and readable, else None (the
    batch is made again). PNGs are written under a temporary name and renamed, so a file that exists
    is whole unless the disk lost it."""
    if not all((out / image_name(i)).is_file() for i in indices):
        return None
    try:
        return [written_entry(out, i) for i in indices]
    except (OSError, ValueError, ConfigError):  # unreadable or without jdiff's metadata
        return None


def manifest_entry(index: int, parameters: dict, height: int, width: int) -> dict:
    return {"file": image_name(index), **parameters, "height": height, "width": width}


def written_entry(out: Path, index: int) -> dict:
    """The manifest entry of an image already on disk, from its own metadata: the same as the one
    written when it was generated."""
    path = out / image_name(index)
    with path.open("rb") as file, Image.open(file) as image:
        width, height = image.size
    return manifest_entry(index, image_io.read_png_parameters(path), height, width)


class Manifest:
    """manifest.jsonl, one JSON line per image in index order, flushed batch by batch (on an object
    store it appears when closed: objects cannot be appended to)."""

    def __init__(self, out: Path):
        self._file = (out / MANIFEST).open("w", encoding="utf-8")  # rewritten: the images on disk are the truth

    def add(self, entries: list[dict]) -> None:
        for entry in entries:
            self._file.write(json.dumps(entry, default=str, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_grid(out: Path, count: int, prompts: list[str]) -> None:
    """grid.png of the first `GRID_IMAGES` images, read back from their files."""
    shown = min(count, GRID_IMAGES)
    images = [image_io.load_image(out / image_name(i)) for i in range(shown)]  # sizes may differ
    image_io.save_png(out / GRID, image_io.image_grid(images), {"prompts": prompts[:shown]})
