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
script records the same two pairs); families without it ignore them. A metadata.jsonl may give
every picture an "aesthetic_score" (float32 in the example), which an SDXL refiner conditions on.

For training a ControlNet, `control_column` names the metadata column that holds each picture's
control image (diffusers' train_controlnet.py calls it "conditioning_image"):

    folder/metadata.jsonl    {"file_name": "cat.png", "text": "a cat", "conditioning_image": "edges/cat.png"}

The control image is scaled to its picture's size and cropped as the picture is, so the two stay
aligned whatever size it was saved at: `folder.control_image(i)`, float32 [R, R, 3] in [0, 1].
`WithControl(source, folder)` adds it to every example of `source` (the folder itself, or the
latents encoded from it) as "control_image", read from disk as batches are drawn rather than held
in memory with the latents.
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
SCORE_COLUMN = "aesthetic_score"  # metadata.jsonl's optional per-picture score (an SDXL refiner's time id)
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


def _decoded_size(path: Path, resolution: int) -> tuple[int, int]:
    """The upright (width, height) `_open_rgb` decodes the picture at, from its header alone."""
    with path.open("rb") as file, Image.open(file) as image:
        image.draft("RGB", (resolution, resolution))
        width, height = image.size
        turned = image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSED_ORIENTATIONS
    return (height, width) if turned else (width, height)


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to `resolution` and the longer one truncated, as
    torchvision's Resize(resolution) in diffusers' training scripts."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def resize_shorter_side(image: Image.Image, resolution: int) -> np.ndarray:
    """uint8 [H, W, 3] with the shorter side scaled to `resolution`."""
    size = resized_size(*image.size, resolution)
    return np.asarray(image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0), np.uint8)


def center_crop(pixels: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The centre `resolution` square of [H, W, C] pixels, and its (top, left), rounded as
    torchvision's CenterCrop rounds them (half to even)."""
    top, left = (int(round((side - resolution) / 2)) for side in pixels.shape[:2])
    return pixels[top:top + resolution, left:left + resolution], (top, left)


def resize_and_center_crop(image: Image.Image, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Shorter side scaled to `resolution`, then the centre square: (uint8 [R, R, 3], the (top,
    left) of the square in the resized picture)."""
    return center_crop(resize_shorter_side(image, resolution), resolution)


def _file(root: Path, path: Path, number: int, name: str) -> Path:
    found = root / name
    if not found.is_file():
        raise ConfigError(f"{str(path)!r} line {number} names {name!r}, but {str(found)!r} does not exist.")
    return found


def _from_metadata(root: Path, caption_column: str,
                   control_column: str | None) -> list[tuple[Path, str, Path | None, float | None]]:
    path = root / METADATA
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{str(path)!r} line {number} is not valid JSON: {e}") from None
        needed = ("file_name", caption_column) + ((control_column,) if control_column else ())
        if not isinstance(record, dict) or any(key not in record for key in needed):
            names = [repr(key) for key in needed]
            raise ConfigError(f"{str(path)!r} line {number} needs the keys {', '.join(names[:-1])} and {names[-1]}; "
                              f"got {line.strip()[:200]!r}.")
        control = _file(root, path, number, record[control_column]) if control_column else None
        score = record.get(SCORE_COLUMN)
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise ConfigError(f"{str(path)!r} line {number}: {SCORE_COLUMN!r} must be a number, got {score!r}.")
        entries.append((_file(root, path, number, record["file_name"]), str(record[caption_column]), control, score))
    given = [entry[3] is not None for entry in entries]
    if any(given) and not all(given):
        raise ConfigError(f"{str(path)!r}: {given.count(True)} of {len(entries)} lines give {SCORE_COLUMN!r}; give "
                          "it on every line or on none.")
    return entries


def _from_text_files(root: Path, allow_missing_captions: bool) -> list[tuple[Path, str, None, None]]:
    images = sorted(p for p in paths.visible_files(root) if p.suffix.lower() in IMAGE_EXTENSIONS)
    entries = []
    for image in images:
        text = image.with_suffix(".txt")
        if text.is_file():
            entries.append((image, text.read_text(encoding="utf-8").strip(), None, None))
        elif allow_missing_captions:
            entries.append((image, "", None, None))
        else:
            raise ConfigError(f"image {str(image)!r} has no caption file {text.name!r} (pass "
                              f"allow_missing_captions=True to train on it with an empty caption).")
    return entries


class ImageFolder:
    """Random-access source (len, [i]) over a folder of captioned images; usable by grain."""

    def __init__(self, root, resolution: int, *, allow_missing_captions: bool = False,
                 caption_column: str = "text", control_column: str | None = None, verify: bool = True):
        self.root = Path(root)
        if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
            raise ConfigError(f"image folder resolution must be a positive integer (got {resolution!r}).")
        self.resolution = int(resolution)
        if not self.root.is_dir():
            raise ConfigError(f"image folder {str(self.root)!r} does not exist or is not a directory.")
        if (self.root / METADATA).is_file():
            entries = _from_metadata(self.root, caption_column, control_column)
        elif control_column:
            raise ConfigError(f"image folder {str(self.root)!r}: control images are named in {METADATA} (a "
                              f"{control_column!r} key per line beside 'file_name'), and it has none.")
        else:
            entries = _from_text_files(self.root, allow_missing_captions)
        if not entries:
            raise ConfigError(f"image folder {str(self.root)!r} holds no images "
                              f"({', '.join(IMAGE_EXTENSIONS)}) and no {METADATA}.")
        self.entries: list[tuple[Path, str]] = []
        self.controls: list[Path] = []  # with control_column: each entry's control image
        self.scores: list[float] = []  # with aesthetic scores in metadata.jsonl: each entry's
        self.skipped: list[tuple[Path, str]] = []  # (image, why) of every unreadable image
        for path, text, control, score in entries:
            try:
                if verify:
                    for image in (path, control) if control else (path,):
                        _open_rgb(image, self.resolution)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                self.skipped.append((path, str(e)))
                warnings.warn(f"skipping unreadable image {str(path)!r} (or its control image): {e}", stacklevel=2)
            else:
                self.entries.append((path, text))
                if control:
                    self.controls.append(control)
                if score is not None:
                    self.scores.append(float(score))
        if not self.entries:
            raise ConfigError(f"image folder {str(self.root)!r}: none of its {len(entries)} images "
                              f"could be read (first: {str(self.skipped[0][0])!r}).")

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        example = self.picture(index)
        pixels, crop_top_left = center_crop(example["image"], self.resolution)
        return {**example, "image": pixels, "crop_top_left": np.asarray(crop_top_left, np.int32)}

    def picture(self, index: int) -> dict:
        """Picture `index` with its shorter side scaled to the resolution, not yet cropped: {"image":
        uint8 [H, W, 3], "caption", "original_size"} (for random crops, `jdiff.data.augment`)."""
        path, text = self.entries[index]
        try:
            image, original_size = _open_rgb(path, self.resolution)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # Opened with verify=False, or the file changed on disk after it was checked.
            raise ConfigError(f"cannot read image {str(path)!r}: {e}") from None
        example = {"image": resize_shorter_side(image, self.resolution), "caption": text,
                   "original_size": np.asarray(original_size, np.int32)}
        if self.scores:
            example[SCORE_COLUMN] = np.float32(self.scores[index])
        return example

    def control_image(self, index: int) -> np.ndarray:
        """Picture `index`'s control image, scaled to the size the picture decodes at and cropped as
        it is: float32 [R, R, 3] in [0, 1] (floats, which the loader leaves as they are)."""
        if not self.controls:
            raise ConfigError(f"image folder {str(self.root)!r} was opened without control images (control_column).")
        path = self.controls[index]
        try:
            size = _decoded_size(self.entries[index][0], self.resolution)
            control, _ = _open_rgb(path, min(size))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ConfigError(f"cannot read control image {str(path)!r} or its picture: {e}") from None
        if control.size != size:
            control = control.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return resize_and_center_crop(control, self.resolution)[0].astype(np.float32) / 255.0

    def __repr__(self) -> str:
        return (f"ImageFolder({str(self.root)!r}, resolution={self.resolution}, "
                f"{len(self)} images, {self.num_skipped} skipped)")


class WithControl:
    """`source` (an ImageFolder opened with control_column, or the latents encoded from it) with each
    example's "control_image" from `folder`; random access, usable by grain."""

    def __init__(self, source, folder: ImageFolder):
        if len(source) != len(folder):
            raise ValueError(f"{len(source)} examples but {len(folder)} pictures in {folder!r}")
        self.source, self.folder = source, folder

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return {**self.source[int(index)], "control_image": self.folder.control_image(int(index))}
