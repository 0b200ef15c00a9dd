"""sample.py's output folder: numbered PNGs, a manifest of them, a record of the run that wrote them,
and a grid of the first images.

A rerun of the same command keeps every batch whose images are all on disk and generates the rest.
Batches are fixed by the job list and the batch size, so each regenerated batch holds the same
images with the same padding as in an uninterrupted run, and its PNGs come out byte-identical. The
record (`run.json`) stops a different command from mixing its images into the folder.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from jdiff import image_io
from jdiff.errors import ConfigError

RECORD = "run.json"
MANIFEST = "manifest.jsonl"
GRID = "grid.png"
GRID_IMAGES = 64  # the grid shows the first images only: memory stays bounded however many there are


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def run_record(model: str, jobs, batch_size: int, settings: dict) -> dict:
    """What must match for a rerun to continue a folder: the model, every job, the batch size (it
    decides which images share a batch, and so their exact pixels) and the settings."""
    listing = json.dumps([[j.prompt, j.negative_prompt, j.seed] for j in jobs], ensure_ascii=False)
    record = {"model": str(model), "images": len(jobs), "jobs_sha256": hashlib.sha256(listing.encode()).hexdigest(),
              "batch_size": batch_size, "settings": settings}
    return json.loads(json.dumps(record, default=str, ensure_ascii=False))  # as the file will read back


def _own_files(out: Path):
    """The files a run writes (never anything else a user keeps in the folder)."""
    for path in out.iterdir():
        stem = path.name.split(".")[0]
        if path.name in (RECORD, MANIFEST, GRID) or (stem.isdigit() and path.name.endswith((".png", ".partial"))):
            yield path


def prepare(out: Path, record: dict, overwrite: bool) -> None:
    """Makes `out` ready for the run `record` describes: removes an earlier run's files with
    `overwrite`, else refuses a folder written by a different command."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in _own_files(out):
            path.unlink()
    elif (out / RECORD).is_file():
        earlier = json.loads((out / RECORD).read_text())
        if earlier != record:
            changed = sorted(k for k in record.keys() | earlier.keys() if record.get(k) != earlier.get(k))
            raise ConfigError(f"{out} holds images of a different run (it differs in {', '.join(changed)}); "
                              f"pass --overwrite to replace them, or choose another --out.")
    elif any(True for _ in _own_files(out)):
        raise ConfigError(f"{out} holds images that no run record ({RECORD}) describes; pass --overwrite "
                          f"to replace them, or choose another --out.")
    partial = out / (RECORD + ".partial")
    partial.write_text(json.dumps(record, indent=1, ensure_ascii=False))
    partial.replace(out / RECORD)


def finished(out: Path, indices) -> bool:
    """Whether every image of a batch is on disk (PNGs are written under a temporary name and renamed,
    so a file that exists is whole)."""
    return all((out / image_name(i)).is_file() for i in indices)


def manifest_entry(index: int, parameters: dict, height: int, width: int) -> dict:
    return {"file": image_name(index), **parameters, "height": height, "width": width}


def written_entry(out: Path, index: int) -> dict:
    """The manifest entry of an image already on disk, from its own metadata: the same as the one
    written when it was generated."""
    path = out / image_name(index)
    with Image.open(path) as image:
        width, height = image.size
    return manifest_entry(index, image_io.read_png_parameters(path), height, width)


class Manifest:
    """manifest.jsonl, one JSON line per image in index order, flushed batch by batch."""

    def __init__(self, out: Path, entries: list[dict]):
        self._file = open(out / MANIFEST, "w", encoding="utf-8")  # rewritten: the images on disk are the truth
        self.add(entries)

    def add(self, entries: list[dict]) -> None:
        for entry in entries:
            self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_grid(out: Path, count: int, prompts: list[str]) -> None:
    """grid.png of the first `GRID_IMAGES` images, read back from their files."""
    shown = min(count, GRID_IMAGES)
    images = np.stack([image_io.load_image(out / image_name(i)) for i in range(shown)])
    image_io.save_png(out / GRID, image_io.image_grid(images), {"prompts": prompts[:shown]})
