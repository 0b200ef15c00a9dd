"""How well a ControlNet trained on the shapes set makes generated objects follow the control image:
for every object a held-out scene places, the detected object's box against the outline's box
(IoU), whether it stands in the controlled cell, and its colour and shape against the caption's.
The same prompts and seeds without the ControlNet are the baseline."""

from typing import Sequence

import numpy as np

from jdiff.app import shapes
from jdiff.app.shapes_eval import detect, match
from jdiff.batching import padded_batches
from jdiff.data import decode_example


def outline_box(placed: shapes.Placed) -> tuple:
    """(left, top, right, bottom) in [0, 1] of an object as `shapes.render` draws it."""
    r = placed.diameter / 2
    return (placed.x - r, placed.y - r, placed.x + r, placed.y + r)


def iou(a: tuple, b: tuple) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(images: Sequence[np.ndarray], scenes: Sequence[Sequence[shapes.Placed]]) -> dict:
    """Per described object (every object of every scene): box IoU with its outline (0 when nothing
    is found), in its controlled cell, colour and shape right; averaged over objects."""
    totals = {"box_iou": 0.0, "in_controlled_cell": 0, "colour_accuracy": 0, "shape_accuracy": 0}
    count = 0
    for image, scene in zip(images, scenes):
        detections = detect(image)
        for placed in scene:
            count += 1
            found = match(detections, placed.object.position)
            if found is None:
                continue
            totals["box_iou"] += iou(found.box, outline_box(placed))
            totals["in_controlled_cell"] += int(found.position == placed.object.position)
            totals["colour_accuracy"] += int(found.colour == placed.object.colour)
            totals["shape_accuracy"] += int(found.shape == placed.object.shape)
    return {key: value / max(count, 1) for key, value in totals.items()} | {"objects": count}


def evaluate(pipe, source, split: str, *, num_prompts: int, guidance: float, sampler: str, steps: int,
             resolution: int, data_seed: int = 0, batch_size: int = 50, seed: int = 1000) -> dict:
    """The first `num_prompts` scenes of `source` (a shapes split): generated with their outlines as
    control images (when `pipe` has a ControlNet attached) and scored against the scenes."""
    from jdiff.pipeline import generate

    count = min(num_prompts, len(source))
    captions = [decode_example(source[i])["caption"] for i in range(count)]
    scenes = [shapes.scene(i, split, data_seed) for i in range(count)]
    controlled = any(name.startswith("controlnet") for name in pipe.modules)
    images = []
    for indices, real in padded_batches(count, batch_size):
        extra = {"control_image": np.stack([shapes.outline(scenes[i], resolution) for i in indices])} \
            if controlled else {}
        batch = generate(pipe, [captions[i] for i in indices], sampler=sampler, steps=steps, guidance=guidance,
                         seed=seed + indices[0], height=resolution, width=resolution, **extra)
        images.extend(batch[:real])
    return {"num_prompts": count, "guidance": guidance, **score(images, scenes)}
