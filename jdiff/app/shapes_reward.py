"""A differentiable reward of how well a picture shows a captioned-shapes scene, for reward
fine-tuning and noise optimisation (jdiff.differentiable).

It is deliberately not the judge (`shapes_eval.detect`, which thresholds, labels connected regions
and reads shapes from angular harmonics): it measures soft colour statistics per grid cell. For every
described object, the colourful pixels of its cell should be near its colour (purity) and cover
what real objects of its shape and size cover (`Calibration`: in real pictures, or as the model's
VAE reconstructs them); colourful pixels in the cells no object was described in are penalised. So
it rewards the right colour in the right place at the right size and nothing extra, and knows
nothing of shape: a gain in the judge's shape accuracy cannot come from the reward grading itself.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.app import shapes

_COLOUR_WIDTH = 0.12  # RGB distance (0..sqrt(3)) at which a pixel's match with a colour falls to exp(-1/2)
_CHROMA_EDGE, _CHROMA_SOFTNESS = 0.18, 0.03  # the detector's colourfulness threshold, softened
_STRAY_WEIGHT = 1.0
_MIN_SHARE = 0.05
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # of the bounding square


class Calibration(NamedTuple):
    """What objects look like to the reward, per [shape, size]: the share of an object's geometric
    area that pixels near its colour cover (`match`), and that colourful pixels cover (`area`).
    Measured on pictures by `calibrate`: on the VAE's reconstructions, the reward asks for what the
    decoder can draw. On reconstructions objects are softer than on the real pictures (colourful
    area 1.39 / 1.25 of the geometric for small / large against 1.26 / 1.18, default run seed 1): a
    reward calibrated on real pictures, whose colour term wants more matching pixels than a blurred
    object has, made small objects grow until the detector read them as large."""

    match: np.ndarray  # [shapes, sizes]
    area: np.ndarray

    def to_json(self) -> dict:
        """The tables as nested lists (4 decimals), for the stages' evaluation files."""
        return {name: np.round(table, 4).tolist() for name, table in self._asdict().items()}


# Measured on 400 real train pictures: pixels near the object's colour cover about 0.8 of it (shades
# vary by +-12 levels, edges are antialiased), colourful pixels about 1.2 of it (the soft threshold
# counts part of the antialiased rim). The default when no pictures to calibrate on are at hand.
REAL_PICTURES = Calibration(np.full((len(shapes.SHAPES), len(shapes.SIZES)), 0.8, np.float32),
                            np.full((len(shapes.SHAPES), len(shapes.SIZES)), 1.2, np.float32))


def scene_targets(scenes, resolution: int, calibration: Calibration = REAL_PICTURES,
                  palette: shapes.Palette = shapes.PALETTE) -> dict:
    """Arrays for `reward` from described scenes (per picture, each object's (shape, colour, size,
    position) ids, as `shapes_eval.described_scenes` gives them): each object's colour, its cell's
    mask, the share of the cell its shape covers at its size's mean diameter, the shares of it that
    `calibration` expects matching and colourful pixels to cover, and the mask of the empty cells."""
    batch, most = len(scenes), shapes.MAX_OBJECTS
    colours = np.zeros((batch, most, 3), np.float32)
    cells = np.zeros((batch, most, resolution, resolution), np.float32)
    shares = np.zeros((batch, most), np.float32)
    match, area = np.ones((batch, most), np.float32), np.ones((batch, most), np.float32)  # 1: finite in empty slots
    valid = np.zeros((batch, most), np.float32)
    empty = np.ones((batch, resolution, resolution), np.float32)
    cell_side = resolution / 3
    for b, objects in enumerate(scenes):
        for k, (shape, colour, size, position) in enumerate(objects):
            row, column = divmod(int(position), 3)
            mask = np.zeros((resolution, resolution), np.float32)
            mask[int(round(row * cell_side)):int(round((row + 1) * cell_side)),
                 int(round(column * cell_side)):int(round((column + 1) * cell_side))] = 1
            cells[b, k], valid[b, k] = mask, 1
            colours[b, k] = np.asarray(palette.rgb[colour], np.float32) / 255
            diameter = np.mean(shapes.DIAMETER_RANGE[shapes.SIZES[size]])  # of the image side
            shares[b, k] = _FILL[shapes.SHAPES[shape]] * (diameter * 3) ** 2  # of the cell
            match[b, k], area[b, k] = calibration.match[shape, size], calibration.area[shape, size]
            empty[b] -= mask
    return {"colours": colours, "cells": cells, "shares": shares, "match_fraction": match, "area_fraction": area,
            "valid": valid, "empty": np.clip(empty, 0, 1)}


def _coverage(images: jax.Array, targets: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per picture: the colourful mask [B, H, W], and per object [B, K] the shares of its geometric
    area covered by pixels near its colour and by colourful pixels in its cell."""
    images = images.astype(jnp.float32)
    chroma = images.max(axis=-1) - images.min(axis=-1)
    colourful = jax.nn.sigmoid((chroma - _CHROMA_EDGE) / _CHROMA_SOFTNESS)  # [B, H, W]
    distance = jnp.sum((images[:, None] - targets["colours"][:, :, None, None]) ** 2, axis=-1)  # [B, K, H, W]
    match = jnp.exp(-distance / (2 * _COLOUR_WIDTH ** 2)) * colourful[:, None]
    cells = targets["cells"]
    per_cell = jnp.maximum(cells.sum(axis=(-2, -1)), 1.0) * targets["shares"].clip(1e-3)
    matched = jnp.sum(match * cells, axis=(-2, -1)) / per_cell
    area = jnp.sum(colourful[:, None] * cells, axis=(-2, -1)) / per_cell
    return colourful, matched, area


def calibrate(images, scenes, resolution: int) -> Calibration:
    """The mean `match` and `area` shares of the described objects in `images` [N, H, W, 3] in [0, 1]
    (pictures that show their scenes: real ones, or their VAE reconstructions), per shape and size;
    a (shape, size) the pictures do not show keeps REAL_PICTURES' value. Shares are kept at least
    _MIN_SHARE, so that pictures with hardly any object (an untrained VAE's) give a finite reward."""
    targets = scene_targets(scenes, resolution)
    _, matched, area = (np.asarray(a) for a in _coverage(jnp.asarray(images, jnp.float32), targets))
    ids = np.zeros(matched.shape + (2,), np.int64)
    for b, objects in enumerate(scenes):
        for k, obj in enumerate(objects):
            ids[b, k] = obj[0], obj[2]
    valid = targets["valid"] > 0
    match_table, area_table = REAL_PICTURES.match.copy(), REAL_PICTURES.area.copy()
    for shape in range(len(shapes.SHAPES)):
        for size in range(len(shapes.SIZES)):
            chosen = valid & (ids[..., 0] == shape) & (ids[..., 1] == size)
            if chosen.any():
                match_table[shape, size] = max(matched[chosen].mean(), _MIN_SHARE)
                area_table[shape, size] = max(area[chosen].mean(), _MIN_SHARE)
    return Calibration(match_table, area_table)


def calibrate_on_reconstructions(pipe, source, count: int = 500) -> Calibration:
    """`calibrate` on `pipe`'s VAE reconstructions of the first `count` pictures of a shapes source:
    what the model's decoder makes of real objects."""
    from jdiff.app import shapes_eval

    images = np.stack(shapes_eval.vae_reconstructions(pipe, source, count))
    return calibrate(images, shapes_eval.described_scenes(source, count), images.shape[1])


def reward(images: jax.Array, targets: dict) -> jax.Array:
    """[B] rewards in about [-1, 1] of pictures [B, H, W, 3] in [0, 1]. Per described object, the
    product of a colour term (the share of the colourful pixels in its cell that are near its colour,
    against the calibration's share; capped at 1) and a size term (colourful pixels in its cell cover
    what the calibration expects of its shape and size: the ratio, or its inverse when larger, so a
    small object drawn large loses as one drawn too small), averaged over the objects; minus the
    colourful share of the cells that should be empty. The colour term is a purity, not a coverage,
    so that it does not grow with the object: with coverage, drawing an object larger raised the
    colour term as much as it lowered the size term, and reward fine-tuning drifted small objects
    into large ones."""
    colourful, matched, area = _coverage(images, targets)
    purity = matched / jnp.maximum(area, 1e-3)
    colour_hit = jnp.minimum(purity / (targets["match_fraction"] / targets["area_fraction"]), 1.0)
    area = area / targets["area_fraction"]
    size_hit = jnp.minimum(area, 1.0 / jnp.maximum(area, 1e-3))
    valid = targets["valid"]
    objects = jnp.sum(colour_hit * size_hit * valid, axis=-1) / jnp.maximum(valid.sum(axis=-1), 1.0)
    empty_area = jnp.maximum(targets["empty"].sum(axis=(-2, -1)), 1.0)
    stray = jnp.sum(colourful * targets["empty"], axis=(-2, -1)) / empty_area
    return objects - _STRAY_WEIGHT * stray / 0.05  # 5% of an empty cell's area coloured cancels a whole object
