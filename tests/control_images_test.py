"""Control images from pictures: Canny edges and depth maps."""

import numpy as np
import pytest
import torch
from PIL import Image

from jdiff import control_images
from jdiff.errors import ConfigError


def square_picture() -> np.ndarray:
    """A white square (rows and columns 8..23) on black, as floats in [0, 1]."""
    picture = np.zeros((32, 32, 3), np.float32)
    picture[8:24, 8:24] = 1.0
    return picture


def test_canny_finds_the_outline_and_nothing_else():
    edges = control_images.canny(square_picture())
    assert edges.shape == (32, 32, 3) and edges.dtype == np.float32
    assert set(np.unique(edges)) == {0.0, 1.0}
    assert np.array_equal(edges[..., 0], edges[..., 2])
    on = edges[..., 0] > 0
    rows, cols = np.nonzero(on)
    # Every edge pixel lies on the square's border (inside or just outside it), and all four sides are found.
    assert rows.min() >= 7 and rows.max() <= 24 and cols.min() >= 7 and cols.max() <= 24
    assert not on[10:22, 10:22].any() and not on[:6].any() and not on[26:].any()
    for side in (on[7:10, 10:22], on[22:25, 10:22], on[10:22, 7:10], on[10:22, 22:25]):
        assert side.any(axis=0).all() or side.any(axis=1).all()


def test_canny_reads_pil_images_and_uint8_alike():
    picture = square_picture()
    pixels = (picture * 255).astype(np.uint8)
    expected = control_images.canny(picture)
    np.testing.assert_array_equal(control_images.canny(pixels), expected)
    np.testing.assert_array_equal(control_images.canny(Image.fromarray(pixels)), expected)
    # Thresholds above every gradient leave no edges.
    assert control_images.canny(picture, 5000, 6000).max() == 0
    with pytest.raises(ConfigError, match="low <= high"):
        control_images.canny(picture, 200, 100)
    with pytest.raises(ConfigError, match=r"\[H, W, 3\]"):
        control_images.canny(np.zeros((32, 32)))


def test_depth_map_is_normalised_as_diffusers_examples_do():
    rng = np.random.default_rng(0)
    depth = rng.uniform(2.0, 9.0, size=(24, 20)).astype(np.float32)
    ours = control_images.depth_map(depth)
    # diffusers' depth ControlNet example: min-max over the map, repeated over three channels
    t = torch.from_numpy(depth)[None, None]
    expected = (t - t.amin(dim=[1, 2, 3], keepdim=True)) / (t.amax(dim=[1, 2, 3], keepdim=True) -
                                                             t.amin(dim=[1, 2, 3], keepdim=True))
    expected = torch.cat([expected] * 3, dim=1)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    resized = control_images.depth_map(depth, size=(48, 40))
    assert resized.shape == (48, 40, 3) and resized.min() == 0.0 and resized.max() == 1.0
    with pytest.raises(ConfigError, match="flat"):
        control_images.depth_map(np.ones((8, 8)))
    with pytest.raises(ConfigError, match="finite"):
        control_images.depth_map(np.full((8, 8), np.nan))
