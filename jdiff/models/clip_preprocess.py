"""Pictures -> CLIP image encoder pixels, as transformers' CLIPImageProcessor (its Pillow backend)
prepares them: RGB, resize (shortest side, bicubic), centre crop, rescale to [0, 1], normalise with
OpenAI CLIP's mean and std. Pillow and numpy only.

`preprocess(images)` uses the defaults (224 pixels); `preprocess(images, "feature_extractor/")` or
`preprocess(images, ImageProcessorConfig.load(path))` reads a `preprocessor_config.json`.
"""

import dataclasses
import math
from typing import Optional

import numpy as np
from PIL import Image

from jdiff import paths
from jdiff.errors import ConfigError
from jdiff.image_io import to_uint8
from jdiff.models.config import parse_config

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "preprocessor_config.json"
# Names of the processor class and of library versions: no effect on the pixels.
_IGNORED = frozenset({"image_processor_type", "feature_extractor_type", "processor_class"})


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    do_convert_rgb: bool = True
    do_resize: bool = True
    shortest_edge: Optional[int] = 224  # resize keeping the aspect ratio...
    resize_to: Optional[tuple] = None  # ...or to this (height, width)
    resample: int = Image.Resampling.BICUBIC.value  # a PIL filter number; 3 = bicubic
    do_center_crop: bool = True
    crop_size: tuple = (224, 224)  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, raw: dict, source: str = CONFIG_NAME) -> "ImageProcessorConfig":
        raw = dict(raw)
        # transformers writes sizes as {"shortest_edge": n} or {"height": h, "width": w}; older files
        # (CLIPFeatureExtractor) as a bare int, which for CLIP means the shortest edge / a square crop.
        if "size" in raw:
            size = raw.pop("size")
            if isinstance(size, int):
                size = {"shortest_edge": size}
            if isinstance(size, dict) and set(size) == {"shortest_edge"}:
                raw.update(shortest_edge=size["shortest_edge"], resize_to=None)
            elif isinstance(size, dict) and set(size) == {"height", "width"}:
                raw.update(shortest_edge=None, resize_to=(size["height"], size["width"]))
            else:
                raise ConfigError(f"{source}: size {size!r} is not supported; use {{'shortest_edge': n}} or "
                                  f"{{'height': h, 'width': w}}.")
        if "crop_size" in raw:
            crop = raw.pop("crop_size")
            if isinstance(crop, int):
                crop = {"height": crop, "width": crop}
            if not (isinstance(crop, dict) and set(crop) == {"height", "width"}):
                raise ConfigError(f"{source}: crop_size {crop!r} is not supported; use {{'height': h, 'width': w}}.")
            raw["crop_size"] = (crop["height"], crop["width"])
        if isinstance(raw.get("resample"), (int, float)):
            raw["resample"] = int(raw["resample"])
        return parse_config(cls, raw, source=source, ignored=_IGNORED,
                            unsupported_defaults={"default_to_square": False, "do_pad": False})

    @classmethod
    def load(cls, path) -> "ImageProcessorConfig":
        """From a preprocessor_config.json, or a folder holding one (a pipeline's `feature_extractor/`)."""
        path = paths.as_path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        raw = paths.read_json(path, ConfigError, missing="does not exist (an image processor config)")
        return cls.from_dict(raw, source=str(path))

    def validate(self, source: str) -> None:
        if self.resample not in {r.value for r in Image.Resampling}:
            raise ConfigError(f"{source}: resample {self.resample!r} is not a PIL filter.")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{source}: {name} needs one value per RGB channel, got {getattr(self, name)!r}.")
        if self.do_resize and self.shortest_edge is None and self.resize_to is None:
            raise ConfigError(f"{source}: do_resize needs a size.")


def _rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image (transparency composited on white, as transformers does),
    uint8 pixels, or floats in [0, 1] (rounded to uint8, as saving them to a PNG would)."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or "transparency" in image.info:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"an image must be HWC with 1 or 3 channels (or a PIL image), got shape {array.shape}.")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"image pixels must be uint8 or floats in [0, 1], got {array.dtype}.")
        array = to_uint8(array)
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _resized_shape(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int]:
    if config.resize_to is not None:
        return tuple(config.resize_to)
    # The short side becomes shortest_edge; the long one scales with it, rounded down.
    short, long = sorted((height, width))
    new_long = int(config.shortest_edge * long / short)
    return (new_long, config.shortest_edge) if width <= height else (config.shortest_edge, new_long)


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central height x width window; a side shorter than the window is zero-padded first,
    with the odd pixel of padding at the start."""
    h, w = array.shape[:2]
    pad_h, pad_w = max(height - h, 0), max(width - w, 0)
    if pad_h or pad_w:
        top, left = math.ceil(pad_h / 2), math.ceil(pad_w / 2)
        array = np.pad(array, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
        h, w = array.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return array[top:top + height, left:left + width]


def preprocess_one(image, config: ImageProcessorConfig) -> np.ndarray:
    array = _rgb(image) if config.do_convert_rgb else np.asarray(image)
    if config.do_resize:
        height, width = _resized_shape(*array.shape[:2], config)
        # Pillow resamples the uint8 pixels (bicubic output is rounded and clipped to 0..255).
        array = np.asarray(Image.fromarray(array).resize((width, height), resample=config.resample))
    if config.do_center_crop:
        array = _center_crop(array, *config.crop_size)
    pixels = array.astype(np.float32)
    if config.do_rescale:
        pixels = (array.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        mean, std = np.float32(config.image_mean), np.float32(config.image_std)
        pixels = (pixels - mean) / std
    return pixels


def preprocess(images, config=None) -> np.ndarray:
    """float32 NHWC pixels for the CLIP image encoder.

    images: one picture or a list of them, each a PIL image, uint8 [H, W, 3|1] / [H, W], or floats
    in [0, 1]; sizes may differ. config: an ImageProcessorConfig, a preprocessor_config.json (or its
    folder), or None for transformers' CLIPImageProcessor defaults.
    """
    if config is None:
        config = ImageProcessorConfig()
    elif not isinstance(config, ImageProcessorConfig):
        config = ImageProcessorConfig.load(config)
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess got no images.")
    out = [preprocess_one(image, config) for image in images]
    shapes = {x.shape for x in out}
    if len(shapes) > 1:
        raise ValueError(f"the processed images differ in shape ({sorted(shapes)}); without a centre crop "
                         f"they cannot share a batch.")
    return np.stack(out)
