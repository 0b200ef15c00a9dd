"""A differentiable reward of how well a picture shows a captioned-shapes scene, for reward
fine-tuning and noise optimisation (jdiff.differentiable).

It is deliberately not the judge (`shapes_eval.detect`, which thresholds, labels connected regions
and reads shapes from angular harmonics): it measures soft colour statistics per grid cell. For every
described object, the share of its cell covered by pixels near its colour should match the share the
object covers in real pictures; colourful pixels in the cells no object was described in are
penalised. So it rewards the right colour in the right place at the right size and nothing extra,
and knows nothing of shape: a gain in the judge's shape accuracy cannot come from the reward grading itself.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.app import shapes

_COLOUR_WIDTH = 0.12  # RGB distance (0..sqrt(3)) at which a pixel's match with a colour falls to exp(-1/2)
_CHROMA_EDGE, _CHROMA_SOFTNESS = 0.18, 0.03  # the detector's colourfulness threshold, softened
_STRAY_WEIGHT = 1.0
# Measured on 400 real train pictures, against each object's geometric share of its cell: pixels
# near the object's colour cover about 0.8 of it (shades vary by +-12 levels, edges are antialiased;
# means 0.69-0.86 by shape, size and colour), colourful pixels about 1.2 of it (the soft threshold
# counts part of the antialiased rim; means 1.17-1.35 by shape and size).
_MATCH_FRACTION = 0.8
_AREA_FRACTION = 1.2


def scene_targets(scenes, resolution: int, palette: shapes.Palette = shapes.PALETTE) -> dict:
    """Arrays for `reward` from described scenes (per picture, each object's (shape, colour, size,
    position) ids, as `shapes_eval.described_scenes` gives them): each object's colour, its cell's
    mask, the share of the cell its shape covers at its size's mean diameter, and the mask of the
    empty cells."""
    batch, most = len(scenes), shapes.MAX_OBJECTS
    colours = np.zeros((batch, most, 3), np.float32)
    cells = np.zeros((batch, most, resolution, resolution), np.float32)
    shares = np.zeros((batch, most), np.float32)
    valid = np.zeros((batch, most), np.float32)
    empty = np.ones((batch, resolution, resolution), np.float32)
    cell_side = resolution / 3
    fill = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    for b, objects in enumerate(scenes):
        for k, (shape, colour, size, position) in enumerate(objects):
            row, column = divmod(int(position), 3)
            mask = np.zeros((resolution, resolution), np.float32)
            mask[int(round(row * cell_side)):int(round((row + 1) * cell_side)),
                 int(round(column * cell_side)):int(round((column + 1) * cell_side))] = 1
            cells[b, k], valid[b, k] = mask, 1
            colours[b, k] = np.asarray(palette.rgb[colour], np.float32) / 255
            diameter = np.mean(shapes.DIAMETER_RANGE[shapes.SIZES[size]])  # of the image side
            shares[b, k] = fill[shapes.SHAPES[shape]] * (diameter * 3) ** 2  # of the cell
            empty[b] -= mask
    return {"colours": colours, "cells": cells, "shares": shares, "valid": valid, "empty": np.clip(empty, 0, 1)}


def reward(images: jax.Array, targets: dict) -> jax.Array:
    """[B] rewards in about [-1, 1] of pictures [B, H, W, 3] in [0, 1]. Per described object, the
    product of a colour term (pixels near its colour cover as much of its cell as a real object's
    do; capped at 1) and a size term (colourful pixels in its cell cover what a real object of its
    shape and size covers: the ratio, or its inverse when larger, so a small object drawn large loses
    as one drawn too small), averaged over the objects; minus the colourful share of the cells that
    should be empty."""
    images = images.astype(jnp.float32)
    chroma = images.max(axis=-1) - images.min(axis=-1)
    colourful = jax.nn.sigmoid((chroma - _CHROMA_EDGE) / _CHROMA_SOFTNESS)  # [B, H, W]
    distance = jnp.sum((images[:, None] - targets["colours"][:, :, None, None]) ** 2, axis=-1)  # [B, K, H, W]
    match = jnp.exp(-distance / (2 * _COLOUR_WIDTH ** 2)) * colourful[:, None]
    cells = targets["cells"]
    cell_area = jnp.maximum(cells.sum(axis=(-2, -1)), 1.0)
    shares = targets["shares"].clip(1e-3)
    matched = jnp.sum(match * cells, axis=(-2, -1)) / cell_area  # [B, K]
    colour_hit = jnp.minimum(matched / (_MATCH_FRACTION * shares), 1.0)
    area = jnp.sum(colourful[:, None] * cells, axis=(-2, -1)) / cell_area / (_AREA_FRACTION * shares)
    size_hit = jnp.minimum(area, 1.0 / jnp.maximum(area, 1e-3))
    valid = targets["valid"]
    objects = jnp.sum(colour_hit * size_hit * valid, axis=-1) / jnp.maximum(valid.sum(axis=-1), 1.0)
    empty_area = jnp.maximum(targets["empty"].sum(axis=(-2, -1)), 1.0)
    stray = jnp.sum(colourful * targets["empty"], axis=(-2, -1)) / empty_area
    return objects - _STRAY_WEIGHT * stray / 0.05  # 5% of an empty cell's area coloured cancels a whole object
