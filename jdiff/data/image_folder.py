"""A folder of the user's own captioned pictures as a random-access source, for fine-tuning.

Two layouts, as in diffusers' training scripts and Hugging Face's `imagefolder`:

    folder/cat.png + folder/cat.txt          caption next to each image (subfolders allowed)
    folder/metadata.jsonl                    {"file_name": "cat.png", "text": "a cat"} per line

If `metadata.jsonl` exists it alone decides which images are used. Every image is decoded once when
the source is opened, so a corrupt file is skipped up front (with a warning naming it) instead of
failing hours into a run; `skipped` lists them (`verify=False` skips this pass for huge folders).
Reading returns the image resized so its shorter side is `resolution`, centre-cropped to a square,
with where it came from: {"image": uint8 [R, R, 3], "caption": str, "original_size": int32 [2], the
upright picture's (height, width) before resizing, "crop_top_left": int32 [2], the (y, x) of the
crop in the resized picture}. SDXL's micro-conditioning is made of these (diffusers' training
script records the same two pairs); families without it ignore them.
"""

import json
import warnings

import numpy as np
from PIL import Image, ImageOps

from jdiff import paths
from jdiff.errors import ConfigError
from jdiff.paths import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees


def _open_rgb(path: Path, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decoded RGB image, upright per its EXIF orientation, and the upright picture's full
    (height, width); transparent areas become white. The size is read before `draft`, which may
    decode a JPEG at a fraction of its size: the picture's true size is what SDXL conditions on."""
    with path.open("rb") as file, Image.open(file) as image:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        # JPEG can decode at 1/2, 1/4, 1/8 scale directly; draft never goes below the requested size.
        image.draft("RGB", (resolution, resolution))
        image = ImageOps.exif_transpose(image)
        image.load()
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB"), (height, width)
    return image.convert("RGB"), (height, width)


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to `resolution`."""
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def resize_and_center_crop(image: Image.Image, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Shorter side scaled to `resolution`, then the centre square: (uint8 [R, R, 3], the (top,
    left) of the square in the resized picture)."""
    size = resized_size(*image.size, resolution)
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.uint8), (top, left)


def resize_and_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """Shorter side scaled to `resolution`, then the centre square: uint8 [R, R, 3]."""
    return resize_and_center_crop(image, resolution)[0]


def _from_metadata(root: Path, caption_column: str) -> list[tuple[Path, str]]:
    path = root / METADATA
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{str(path)!r} line {number} is not valid JSON: {e}") from None
        if not isinstance(record, dict) or "file_name" not in record or caption_column not in record:
            raise ConfigError(f"{str(path)!r} line {number} needs the keys 'file_name' and "
                              f"{caption_column!r}; got {line.strip()[:200]!r}.")
        image = root / record["file_name"]
        if not image.is_file():
            raise ConfigError(f"{str(path)!r} line {number} names {record['file_name']!r}, but "
                              f"{str(image)!r} does not exist.")
        entries.append((image, str(record[caption_column])))
    return entries


def _from_text_files(root: Path, allow_missing_captions: bool) -> list[tuple[Path, str]]:
    images = sorted(p for p in paths.visible_files(root) if p.suffix.lower() in IMAGE_EXTENSIONS)
    entries = []
    for image in images:
        text = image.with_suffix(".txt")
        if text.is_file():
            entries.append((image, text.read_text(encoding="utf-8").strip()))
        elif allow_missing_captions:
            entries.append((image, ""))
        else:
            raise ConfigError(f"image {str(image)!r} has no caption file {text.name!r} (pass "
                              f"allow_missing_captions=True to train on it with an empty caption).")
    return entries


class ImageFolder:
    """Random-access source (len, [i]) over a folder of captioned images; usable by grain."""

    def __init__(self, root, resolution: int, *, allow_missing_captions: bool = False,
                 caption_column: str = "text", verify: bool = True):
        self.root = Path(root)
        if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
            raise ConfigError(f"image folder resolution must be a positive integer (got {resolution!r}).")
        self.resolution = int(resolution)
        if not self.root.is_dir():
            raise ConfigError(f"image folder {str(self.root)!r} does not exist or is not a directory.")
        if (self.root / METADATA).is_file():
            entries = _from_metadata(self.root, caption_column)
        else:
            entries = _from_text_files(self.root, allow_missing_captions)
        if not entries:
            raise ConfigError(f"image folder {str(self.root)!r} holds no images "
                              f"({', '.join(IMAGE_EXTENSIONS)}) and no {METADATA}.")
        self.entries: list[tuple[Path, str]] = []
        self.skipped: list[tuple[Path, str]] = []  # (image, why) of every unreadable image
        for path, text in entries:
            try:
                if verify:
                    _open_rgb(path, self.resolution)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                self.skipped.append((path, str(e)))
                warnings.warn(f"skipping unreadable image {str(path)!r}: {e}", stacklevel=2)
            else:
                self.entries.append((path, text))
        if not self.entries:
            raise ConfigError(f"image folder {str(self.root)!r}: none of its {len(entries)} images "
                              f"could be read (first: {str(self.skipped[0][0])!r}).")

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        path, text = self.entries[index]
        try:
            image, original_size = _open_rgb(path, self.resolution)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # Opened with verify=False, or the file changed on disk after it was checked.
            raise ConfigError(f"cannot read image {str(path)!r}: {e}") from None
        pixels, crop_top_left = resize_and_center_crop(image, self.resolution)
        return {"image": pixels, "caption": text, "original_size": np.asarray(original_size, np.int32),
                "crop_top_left": np.asarray(crop_top_left, np.int32)}

    def __repr__(self) -> str:
        return (f"ImageFolder({str(self.root)!r}, resolution={self.resolution}, "
                f"{len(self)} images, {self.num_skipped} skipped)")
