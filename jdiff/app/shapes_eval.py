"""Prompt adherence on the captioned-shapes set: a classical detector reads an image's objects
(colour, shape, size, position), and generated images are scored against their prompts.

The detector needs no training: the background is grey and every object colour is saturated, so
colourfulness (max - min channel) separates objects from background; connected regions are the
objects; the nearest palette colour names the colour; the centroid's 3x3 cell names the position.
The shape comes from angular harmonics of the region's mass around its centroid, which blur does not
flip: an upright triangle has a strong 3-fold harmonic pointing down, an axis-aligned square a
negative 4-fold one (its mass reaches out along the diagonals), a circle neither.
`detector_accuracy` checks it on real images (1.00 on 300 test images; the thresholds sit midway
between the classes on train images) and `evaluate_pipeline` also reports it on the model's own VAE
reconstructions of real images: the most a diffusion model decoding through that VAE can score.
"""

from typing import NamedTuple, Sequence

import numpy as np

from jdiff.app import shapes
from jdiff.batching import map_batches, padded_batches
from jdiff.data import decode_example, to_model_range

_MIN_CHROMA = 0.18  # colourfulness separating objects from the grey background
_MIN_PIXELS = 3
# On 400 real train images (dataset 1.2.0, 32 px): triangles' downward 3-fold harmonic >= 0.54,
# other shapes' <= 0.07; squares' 4-fold harmonic <= -0.32, circles' >= -0.07. Thresholds midway
# (set on 1.1.0, whose smaller objects gave 0.49 / 0.10 and -0.31 / -0.12).
_TRIANGLE_MIN_H3 = 0.3
_SQUARE_MAX_H4 = -0.21


class Detection(NamedTuple):
    colour: int
    shape: int
    size: int
    position: int
    pixels: float  # covered area in pixels (soft)
    centre: tuple  # (x, y) in [0, 1]
    box: tuple = None  # (left, top, right, bottom) in [0, 1]: the pixels the object covers


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


# Area of each shape over the area of its bounding box (upright triangles fill half of theirs).
_BOX_FILL = {shapes.SHAPES.index("circle"): np.pi / 4, shapes.SHAPES.index("square"): 1.0,
             shapes.SHAPES.index("triangle"): 0.5}


def detect(image: np.ndarray, palette: shapes.Palette = shapes.PALETTE) -> list[Detection]:
    """Objects in an image ([H, W, 3], float in [0, 1] or uint8), largest first; colours are ids
    into `palette` (a longer palette lets the detector name colours the set never shows)."""
    image = np.asarray(image, np.float32)
    if image.max() > 1.5:
        image = image / 255.0
    side = image.shape[0]
    chroma = image.max(axis=-1) - image.min(axis=-1)
    reference = np.asarray(palette.rgb, np.float32) / 255.0
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
        colour = int(np.argmin(((reference - rgb) ** 2).sum(axis=-1)))
        # Soft coverage: antialiased edge pixels count by how colourful they are.
        coverage = np.clip(box_chroma / max(float(box_chroma[core].mean()), 1e-3), 0, 1)
        height, width = bottom - top + 1, right - left + 1
        shape = _shape(chroma, region, side)
        # The diameter from the soft area and the shape's fill of its box: sub-pixel, where the
        # box's whole pixels cannot tell 7 px from 8.
        diameter = float(np.sqrt(coverage.sum() / _BOX_FILL[shape])) / side
        small_max = (shapes.DIAMETER_RANGE["small"][1] + shapes.DIAMETER_RANGE["large"][0]) / 2
        size = 0 if diameter < small_max else 1
        cy = float((coverage * (np.arange(height)[:, None] + top + 0.5)).sum() / coverage.sum()) / side
        cx = float((coverage * (np.arange(width)[None, :] + left + 0.5)).sum() / coverage.sum()) / side
        position = 3 * min(int(cy * 3), 2) + min(int(cx * 3), 2)
        bounds = (left / side, top / side, (right + 1) / side, (bottom + 1) / side)
        detections.append(Detection(colour, shape, size, position, float(coverage.sum()), (cx, cy), bounds))
    return sorted(detections, key=lambda d: -d.pixels)


def _shape(chroma: np.ndarray, region: np.ndarray, side: int) -> int:
    """Circle, square or triangle from the angular harmonics of the region's soft mass."""
    rows, cols = region[:, 0], region[:, 1]
    top, bottom = max(rows.min() - 1, 0), min(rows.max() + 1, side - 1)  # one pixel more: blurred edges
    left, right = max(cols.min() - 1, 0), min(cols.max() + 1, side - 1)
    weight = np.clip(chroma[top:bottom + 1, left:right + 1] / max(float(np.median(chroma[rows, cols])), 1e-3), 0, 1)
    weight = np.where(weight > 0.25, weight, 0.0)
    ys, xs = np.mgrid[top:bottom + 1, left:right + 1] + 0.5
    dy = ys - (weight * ys).sum() / weight.sum()
    dx = xs - (weight * xs).sum() / weight.sum()
    radius, angle = np.hypot(dx, dy), np.arctan2(-dy, dx)  # angle counter-clockwise, y up
    # Weighted by r^3 / r^4 so the outline, not the interior, decides.
    h3 = (weight * radius ** 3 * np.exp(3j * angle)).sum() / max((weight * radius ** 3).sum(), 1e-9)
    h4 = (weight * radius ** 4 * np.cos(4 * angle)).sum() / max((weight * radius ** 4).sum(), 1e-9)
    if -h3.imag > _TRIANGLE_MIN_H3:  # an upright triangle's corners at 90, 210, 330 degrees
        return shapes.SHAPES.index("triangle")
    if h4 < _SQUARE_MAX_H4:
        return shapes.SHAPES.index("square")
    return shapes.SHAPES.index("circle")


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


def score(images: Sequence[np.ndarray], objects: Sequence[Sequence[int]],
          palette: shapes.Palette = shapes.PALETTE) -> dict:
    """Accuracy of each attribute of the described first objects. objects: per image, the first
    object's (shape, colour, size, position) ids."""
    hits = {"colour": 0, "shape": 0, "size": 0, "position": 0, "all": 0, "found": 0}
    for image, (shape, colour, size, position) in zip(images, objects):
        found = match(detect(image, palette), position)
        if found is None:
            continue
        ok = {"colour": found.colour == colour, "shape": found.shape == shape, "size": found.size == size,
              "position": found.position == position}
        ok["all"] = all(ok.values())
        ok["found"] = True
        for key, value in ok.items():
            hits[key] += int(value)
    return {f"{key}_accuracy": value / max(len(objects), 1) for key, value in hits.items()}


def score_scenes(images: Sequence[np.ndarray], scenes: Sequence[Sequence[Sequence[int]]],
                 palette: shapes.Palette = shapes.PALETTE) -> dict:
    """Whole-scene adherence, as GenEval scores real models: every object a caption describes.

    scenes: per image, every described object's (shape, colour, size, position) ids. An object is
    right when the largest detection in its cell has its colour, shape and size; a scene is right
    when every object is right and nothing else was drawn (as many detections as objects). Fractions
    of scenes, in categories: single-object and two-object scenes; colour attribution (two objects of
    different colours, each cell holding its own object's colour); position (every object in its
    cell). Per-object attribute accuracies (the nearest detection when the cell is empty, as `score`)
    say which attribute fails.
    """
    tallies = {name: [0, 0] for name in ("whole_scene", "count", "every_object", "single_object", "two_objects",
                                         "colour_attribution", "position")}
    attributes = {name: 0 for name in ("colour", "shape", "size", "position")}
    num_objects = 0

    def tally(name, ok):
        tallies[name][0] += int(ok)
        tallies[name][1] += 1

    for image, objects in zip(images, scenes):
        detections = detect(image, palette)
        in_cell = [next((d for d in detections if d.position == obj[3]), None) for obj in objects]
        right = [d is not None and (d.shape, d.colour, d.size) == tuple(obj[:3]) for d, obj in zip(in_cell, objects)]
        count_right = len(detections) == len(objects)
        whole = count_right and all(right)
        tally("whole_scene", whole)
        tally("count", count_right)
        tally("every_object", all(right))
        tally("single_object" if len(objects) == 1 else "two_objects", whole)
        tally("position", all(d is not None for d in in_cell))
        if len(objects) == 2 and objects[0][1] != objects[1][1]:
            tally("colour_attribution", all(d is not None and d.colour == obj[1] for d, obj in zip(in_cell, objects)))
        for obj in objects:
            num_objects += 1
            found = match(detections, obj[3])
            if found is not None:
                for key, value in zip(("shape", "colour", "size", "position"), obj):
                    attributes[key] += int(getattr(found, key) == value)
    results = {f"{name}_accuracy": hits / max(total, 1) for name, (hits, total) in tallies.items()}
    results.update({f"object_{key}_accuracy": hits / max(num_objects, 1) for key, hits in attributes.items()})
    results.update({f"{name}_scenes": total for name, (_, total) in tallies.items()
                    if name in ("single_object", "two_objects", "colour_attribution")})
    return results


def described_scenes(source, count: int) -> list[list[tuple]]:
    """Every described object's (shape, colour, size, position) ids, per example of a shapes source."""
    items = [source[i] for i in range(min(count, len(source)))]
    return scenes_of_batch({"objects": np.stack([np.asarray(it["objects"]) for it in items]),
                            "num_objects": np.asarray([it["num_objects"] for it in items])})


def scenes_of_batch(batch: dict) -> list[list[tuple]]:
    """`described_scenes` of a batch of shapes examples ("objects" [B, MAX_OBJECTS, 4] padded with -1,
    "num_objects" [B])."""
    tables = np.asarray(batch["objects"]).reshape(len(batch["num_objects"]), -1, 4)
    return [[tuple(int(v) for v in row) for row in table[:int(n)]] for table, n in zip(tables, batch["num_objects"])]


def first_objects(source, count: int) -> tuple[list[str], list[tuple]]:
    """Captions and first-object labels of the first `count` examples of a shapes source."""
    captions, labels = [], []
    for i in range(min(count, len(source))):
        item = decode_example(source[i])
        captions.append(item["caption"])
        labels.append(tuple(int(item[k]) for k in ("shape", "colour", "size", "position")))
    return captions, labels


def detector_accuracy(source, count: int = 500, palette: shapes.Palette = shapes.PALETTE) -> dict:
    """The detector on real images of `source`: how well it reads ground truth."""
    _, labels = first_objects(source, count)
    images = [source[i]["image"] for i in range(len(labels))]
    return score(images, labels, palette)


def scene_detector_accuracy(source, count: int = 500, palette: shapes.Palette = shapes.PALETTE) -> dict:
    """`score_scenes` on real images of `source`: the ceiling of the whole-scene figures (about 1)."""
    scenes = described_scenes(source, count)
    return score_scenes([source[i]["image"] for i in range(len(scenes))], scenes, palette)


def vae_reconstructions(pipe, source, count: int, batch_size: int = 50) -> list[np.ndarray]:
    """The pipeline's VAE reconstructions (posterior mode) of the first `count` real images, in [0, 1]."""
    import jax

    vae, params = pipe.vae, pipe.params["vae"]
    reconstruct = jax.jit(lambda p, x: vae.apply({"params": p}, x))
    real = to_model_range(np.stack([source[i]["image"] for i in range(min(count, len(source)))]))
    rebuilt = map_batches(lambda batch: reconstruct(params, batch), real, batch_size)
    return list(np.clip(rebuilt.astype(np.float32) * 0.5 + 0.5, 0.0, 1.0))


def vae_ceiling(pipe, source, count: int, batch_size: int = 50, palette: shapes.Palette = shapes.PALETTE) -> dict:
    """The detector on the pipeline's VAE reconstructions of real images: what a perfect diffusion
    model, whose latents still pass through this decoder, would score (first objects)."""
    _, labels = first_objects(source, count)
    return score(vae_reconstructions(pipe, source, count, batch_size), labels, palette)


def evaluate_pipeline(pipe, source, *, num_prompts: int, guidances: Sequence[float], sampler: str, steps: int,
                      batch_size: int = 50) -> dict:
    """Generates an image for each of the first `num_prompts` captions of `source` (held-out
    combinations on the test split) at each guidance scale and scores them."""
    captions, labels = first_objects(source, num_prompts)
    scenes = described_scenes(source, num_prompts)
    rebuilt = vae_reconstructions(pipe, source, num_prompts, batch_size)
    results = {"num_prompts": len(captions), "sampler": sampler, "steps": steps,
               "detector_on_real_images": detector_accuracy(source, num_prompts),
               "detector_on_vae_reconstructions": score(rebuilt, labels),
               "scene_detector_on_real_images": scene_detector_accuracy(source, num_prompts),
               "scene_detector_on_vae_reconstructions": score_scenes(rebuilt, scenes)}
    for guidance in guidances:
        images = generate_batched(pipe, captions, guidance=guidance, sampler=sampler, steps=steps,
                                  batch_size=batch_size)
        results[f"guidance_{guidance:g}"] = score(images, labels)  # the first object, as before
        results[f"scene_guidance_{guidance:g}"] = score_scenes(images, scenes)
    return results


def generate_batched(pipe, captions: Sequence[str], *, guidance: float, sampler: str, steps: int,
                     batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """One image per caption, in fixed-size batches (the last padded: one compiled batch shape);
    caption i's image is drawn from seed `seed + i`."""
    from jdiff.pipeline import generate

    images = []
    for indices, real in padded_batches(len(captions), batch_size):
        batch = generate(pipe, [captions[i] for i in indices], sampler=sampler, steps=steps, guidance=guidance,
                         seed=seed + indices[0])
        images.extend(batch[:real])
    return images
