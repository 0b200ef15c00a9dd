"""Depth-to-image (Stable Diffusion 2 depth): a U-Net with one input channel more than the latents,
which reads a depth map of the picture beside the latents at every step.

The depth map is given (jdiff has no depth estimator: diffusers' pipeline runs DPT when none is
given). It is brought to the latent size and scaled to [-1, 1] per image exactly as diffusers'
StableDiffusionDepth2ImgPipeline does, including PyTorch's bicubic interpolation, whose kernel
(a = -0.75, no antialiasing) differs from Pillow's and jax.image's.
"""

import io

import numpy as np
from PIL import Image

from jdiff import paths
from jdiff.errors import ConfigError


def takes_depth(pipe) -> bool:
    """True for a depth-to-image U-Net: its input is the latents plus one depth channel."""
    unet = pipe.modules.get("unet")
    return unet is not None and unet.config.in_channels == pipe.latent_channels + 1


def read_depth_map(path) -> np.ndarray:
    """A depth map file as float32 [H, W]: a .npy array, or a greyscale image (8- or 16-bit PNG)."""
    path = paths.as_path(path)
    if not path.is_file():
        raise ConfigError(f"depth map {str(path)!r} does not exist.")
    data = path.read_bytes()
    try:
        if path.suffix == ".npy":
            depth = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            with Image.open(io.BytesIO(data)) as image:
                depth = np.asarray(image if image.mode in ("I", "I;16", "F", "L") else image.convert("L"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read depth map {str(path)!r}: {e}") from None
    return np.asarray(depth, np.float32)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """[N, 4] weights of the samples at offsets -1, 0, 1, 2 around position t in [0, 1)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_axis(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Bicubic resampling of one axis as torch's interpolate(mode="bicubic", align_corners=False)."""
    length = values.shape[axis]
    source = (np.arange(size) + 0.5) * (length / size) - 0.5
    first = np.floor(source).astype(np.int64)
    weights = _cubic_weights(source - first)  # [size, 4]
    taps = np.clip(first[:, None] + np.arange(-1, 3)[None, :], 0, length - 1)  # border samples repeat
    moved = np.moveaxis(values, axis, -1)
    resized = np.einsum("...sk,sk->...s", moved[..., taps], weights)
    return np.moveaxis(resized, -1, axis)


def depth_condition(depth_map, batch: int, height: int, width: int) -> np.ndarray:
    """The U-Net's depth channel [B, height, width, 1] (latent size) from depth estimates [H, W] or
    [B, H, W] (any units, larger = nearer): resized bicubically, then 2 * (d - min) / (max - min) - 1
    per image."""
    depth = np.asarray(depth_map, np.float64)
    if depth.ndim == 2:
        depth = depth[None]
    if depth.ndim == 4 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 3:
        raise ConfigError(f"depth_map must be [H, W] or [B, H, W], got shape {np.shape(depth_map)}.")
    if depth.shape[0] == 1 and batch > 1:
        depth = np.repeat(depth, batch, axis=0)
    if depth.shape[0] != batch:
        raise ConfigError(f"depth_map has {depth.shape[0]} maps for {batch} prompts.")
    if not np.all(np.isfinite(depth)):
        raise ConfigError("depth_map holds NaN or infinite values.")
    resized = _resize_axis(_resize_axis(depth, height, 1), width, 2)
    low = resized.min(axis=(1, 2), keepdims=True)
    high = resized.max(axis=(1, 2), keepdims=True)
    if np.any(high == low):
        raise ConfigError("a depth map is flat: it holds no depth to condition on.")
    return (2.0 * (resized - low) / (high - low) - 1.0)[..., None].astype(np.float32)
