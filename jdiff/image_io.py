"""Reading input images and writing PNGs that carry their generation parameters."""

import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, PngImagePlugin

from jdiff.errors import ConfigError


def load_image(path, mode: str = "RGB") -> np.ndarray:
    """[H, W, 3] (mode "RGB") or [H, W] (mode "L") float32 in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"image {str(path)!r} does not exist.")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode), np.float32) / 255.0
    except (OSError, SyntaxError) as e:
        raise ConfigError(f"cannot read image {str(path)!r}: {e}") from None


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(image, np.float32), 0, 1) * 255).round().astype(np.uint8)


def save_png(path, image: np.ndarray, parameters: Mapping) -> None:
    """Writes image [H, W, 3] in [0, 1]; `parameters` go into the PNG's text chunks, one per key,
    and all together as JSON under "parameters". Written to a temporary name first, so an
    interrupted run never leaves a truncated file under the final name."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for key, value in parameters.items():
        info.add_text(str(key), str(value))
    info.add_text("parameters", json.dumps(dict(parameters), default=str))
    partial = path.with_name(path.name + ".partial")
    Image.fromarray(to_uint8(image)).save(partial, format="PNG", pnginfo=info)
    partial.replace(path)


def read_png_parameters(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["parameters"])


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles images [N, H, W, 3] into one [rows*(H+pad)-pad, cols*(W+pad)-pad, 3] image (white gaps)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.ones((rows * (h + pad) - pad, columns * (w + pad) - pad, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = image
    return grid
