"""Control images from pictures, for the preprocessors that need no learned model: Canny edges
(OpenCV's `cv2.Canny`, the detector the released canny ControlNets were trained with) and a given
depth map normalised as diffusers' depth ControlNet examples normalise it. Depth estimation itself
(a learned model) is out of scope: bring the map from any estimator.

Both return [H, W, 3] float32 in [0, 1], what `generate(control_image=...)` takes.
"""

import numpy as np
from PIL import Image

from jdiff.errors import ConfigError
from jdiff.image_io import to_uint8


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("Canny edges use OpenCV: pip install opencv-python-headless "
                          "(or jdiff-diffusion[control]).") from None
    return cv2


def _picture(image) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image, uint8 pixels, or floats in [0, 1]."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ConfigError(f"a picture must be [H, W, 3], got shape {array.shape}.")
    return array if array.dtype == np.uint8 else to_uint8(array)


def canny(image, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """White edges on black: OpenCV's Canny detector on the picture's pixels, with the thresholds
    diffusers' ControlNet examples use (100, 200)."""
    if not 0 <= low_threshold <= high_threshold:
        raise ConfigError(f"Canny thresholds must satisfy 0 <= low <= high, got {low_threshold}, {high_threshold}.")
    edges = _cv2().Canny(_picture(image), low_threshold, high_threshold)
    return np.repeat(edges[..., None], 3, axis=-1).astype(np.float32) / 255.0


def depth_map(depth, size: tuple[int, int] | None = None) -> np.ndarray:
    """A depth estimate [H, W] (any units; larger = nearer, as MiDaS/DPT give it) as a control image:
    resized bicubically to `size` (height, width) if given, then scaled to span [0, 1] and repeated
    over three channels, as diffusers' depth ControlNet examples do."""
    depth = np.asarray(depth, np.float32)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2 or not np.all(np.isfinite(depth)):
        raise ConfigError(f"a depth map must be a finite [H, W] array, got shape {depth.shape}.")
    if size is not None:
        height, width = size
        depth = np.asarray(Image.fromarray(depth).resize((width, height), Image.BICUBIC), np.float32)
    low, high = depth.min(), depth.max()
    if high == low:
        raise ConfigError("the depth map is flat: it holds no depth to control with.")
    normalised = (depth - low) / (high - low)
    return np.repeat(normalised[..., None], 3, axis=-1)
