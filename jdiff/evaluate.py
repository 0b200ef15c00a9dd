"""Prompt adherence on the captioned-shapes set: a classical detector reads an image's objects
(colour, shape, size, position), and generated images are scored against their prompts.

The detector needs no training: the background is grey and every object colour is saturated, so
colourfulness (max - min channel) separates objects from background; connected regions are the
objects; the nearest palette colour names the colour; where a region's mass sits in its bounding
box (a triangle's is low) and whether it reaches the box's corners (a square does, a circle does
not) name the shape; the centroid's 3x3 cell names the position. `detector_accuracy` checks it on real images.
"""

from typing import NamedTuple, Sequence

import numpy as np

from jdiff.data import decode_example, shapes

_PALETTE = np.asarray([shapes.COLOUR_RGB[c] for c in shapes.COLOURS], np.float32) / 255.0
_MIN_CHROMA = 0.18  # colourfulness separating objects from the grey background
_MIN_PIXELS = 3


class Detection(NamedTuple):
    colour: int
    shape: int
    size: int
    position: int
    pixels: float  # covered area in pixels (soft)
    centre: tuple  # (x, y) in [0, 1]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, each as an [N, 2] array of (row, col)."""
    seen = np.zeros_like(mask, bool)
    regions = []
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < h and 0 <= nc < w and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        regions.append(np.asarray(pixels))
    return regions


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in an image ([H, W, 3], float in [0, 1] or uint8), largest first."""
    image = np.asarray(image, np.float32)
    if image.max() > 1.5:
        image = image / 255.0
    side = image.shape[0]
    chroma = image.max(axis=-1) - image.min(axis=-1)
    detections = []
    for region in _components(chroma > _MIN_CHROMA):
        if len(region) < _MIN_PIXELS:
            continue
        rows, cols = region[:, 0], region[:, 1]
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        box = image[top:bottom + 1, left:right + 1]
        box_chroma = chroma[top:bottom + 1, left:right + 1]
        core = box_chroma >= np.quantile(chroma[rows, cols], 0.5)
        rgb = box[core].mean(axis=0)
        colour = int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=-1)))
        # Soft coverage: antialiased edge pixels count by how colourful they are.
        coverage = np.clip(box_chroma / max(float(box_chroma[core].mean()), 1e-3), 0, 1)
        height, width = bottom - top + 1, right - left + 1
        fill = coverage.sum() / (height * width)
        ys = (np.arange(height)[:, None] + 0.5) / height
        mass_low = float((coverage * ys).sum() / coverage.sum()) - 0.5  # > 0: mass in the lower half
        corners = float(np.mean([coverage[0, 0], coverage[0, -1], coverage[-1, 0], coverage[-1, -1]]))
        if mass_low > 0.06:  # a triangle's mass sits low in its box (centroid at 2/3 height)
            shape = shapes.SHAPES.index("triangle")
        elif corners > 0.15 or fill > 0.85:  # a square reaches its box's corners, a circle does not
            shape = shapes.SHAPES.index("square")
        else:
            shape = shapes.SHAPES.index("circle")
        diameter = max(height, width) / side
        small_max = (shapes.DIAMETER_RANGE["small"][1] + shapes.DIAMETER_RANGE["large"][0]) / 2
        size = 0 if diameter < small_max else 1
        cy = float((coverage * (np.arange(height)[:, None] + top + 0.5)).sum() / coverage.sum()) / side
        cx = float((coverage * (np.arange(width)[None, :] + left + 0.5)).sum() / coverage.sum()) / side
        position = 3 * min(int(cy * 3), 2) + min(int(cx * 3), 2)
        detections.append(Detection(colour, shape, size, position, float(coverage.sum()), (cx, cy)))
    return sorted(detections, key=lambda d: -d.pixels)


def match(detections: Sequence[Detection], position: int) -> Detection | None:
    """The detection standing for an object described at `position`: the largest one in that
    cell, else the nearest one (so a misplaced object still counts for colour and shape)."""
    if not detections:
        return None
    here = [d for d in detections if d.position == position]
    if here:
        return here[0]
    row, column = divmod(position, 3)
    target = ((column + 0.5) / 3, (row + 0.5) / 3)
    return min(detections, key=lambda d: (d.centre[0] - target[0]) ** 2 + (d.centre[1] - target[1]) ** 2)


def score(images: Sequence[np.ndarray], objects: Sequence[Sequence[int]]) -> dict:
    """Accuracy of each attribute of the described first objects. objects: per image, the first
    object's (shape, colour, size, position) ids."""
    hits = {"colour": 0, "shape": 0, "size": 0, "position": 0, "all": 0, "found": 0}
    for image, (shape, colour, size, position) in zip(images, objects):
        found = match(detect(image), position)
        if found is None:
            continue
        ok = {"colour": found.colour == colour, "shape": found.shape == shape, "size": found.size == size,
              "position": found.position == position}
        ok["all"] = all(ok.values())
        ok["found"] = True
        for key, value in ok.items():
            hits[key] += int(value)
    return {f"{key}_accuracy": value / max(len(objects), 1) for key, value in hits.items()}


def first_objects(source, count: int) -> tuple[list[str], list[tuple]]:
    """Captions and first-object labels of the first `count` examples of a shapes source."""
    captions, labels = [], []
    for i in range(min(count, len(source))):
        item = decode_example(source[i])
        captions.append(item["caption"])
        labels.append(tuple(int(item[k]) for k in ("shape", "colour", "size", "position")))
    return captions, labels


def detector_accuracy(source, count: int = 500) -> dict:
    """The detector on real images of `source`: how well it reads ground truth."""
    _, labels = first_objects(source, count)
    images = [source[i]["image"] for i in range(len(labels))]
    return score(images, labels)


def evaluate_pipeline(pipe, source, *, num_prompts: int, guidances: Sequence[float], sampler: str, steps: int,
                      batch_size: int = 50) -> dict:
    """Generates an image for each of the first `num_prompts` captions of `source` (held-out
    combinations on the test split) at each guidance scale and scores them."""
    from jdiff.pipeline import generate

    captions, labels = first_objects(source, num_prompts)
    results = {"num_prompts": len(captions), "sampler": sampler, "steps": steps,
               "detector_on_real_images": detector_accuracy(source, num_prompts)}
    for guidance in guidances:
        images = []
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled batch shape
            images.extend(generate(pipe, chunk, sampler=sampler, steps=steps, guidance=guidance, seed=start)
                          [:len(captions) - start])
        results[f"guidance_{guidance:g}"] = score(images, labels)
    return results
