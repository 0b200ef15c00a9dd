"""Whole-scene adherence (jdiff.app.shapes_eval.score_scenes): every described object is scored,
on real pictures (the ceiling, 1.0) and on pictures altered in the ways a model fails."""

import numpy as np

from jdiff.app import shapes
from jdiff.app.shapes_eval import score_scenes


def _scene(index):
    return shapes.scene(index, "test", 0)


def _picture(placed, index=0):
    return shapes.render(placed, 32, np.random.default_rng(index))


def _described(placed):
    return [tuple(p.object) for p in placed]


def _two_object_scenes(count):
    found = [i for i in range(400) if len(_scene(i)) == 2]
    return found[:count]


def test_real_pictures_score_one_in_every_category():
    scenes = [_scene(i) for i in range(300)]
    result = score_scenes([_picture(s, i) for i, s in enumerate(scenes)], [_described(s) for s in scenes])
    for name in ("whole_scene", "count", "every_object", "single_object", "two_objects", "colour_attribution",
                 "position", "object_colour", "object_shape", "object_size", "object_position"):
        assert result[f"{name}_accuracy"] >= 0.99, (name, result)
    assert result["single_object_scenes"] + result["two_objects_scenes"] == 300
    assert 0 < result["colour_attribution_scenes"] <= result["two_objects_scenes"]


def test_a_missing_second_object_fails_count_and_the_two_object_category_only():
    indices = _two_object_scenes(20)
    scenes = [_scene(i) for i in indices]
    pictures = [_picture(s[:1], i) for i, s in zip(indices, scenes)]  # the second object is not drawn
    result = score_scenes(pictures, [_described(s) for s in scenes])
    assert result["count_accuracy"] == 0 and result["whole_scene_accuracy"] == 0
    assert result["two_objects_accuracy"] == 0 and result["position_accuracy"] == 0
    assert result["object_colour_accuracy"] >= 0.5  # the first object is still right


def test_swapped_colours_fail_colour_attribution_but_not_count_or_shape():
    indices = [i for i in _two_object_scenes(60) if _scene(i)[0].rgb != _scene(i)[1].rgb
               and _scene(i)[0].object.colour != _scene(i)[1].object.colour][:20]
    scenes = [_scene(i) for i in indices]
    swapped = [(a._replace(rgb=b.rgb), b._replace(rgb=a.rgb)) for a, b in scenes]
    result = score_scenes([_picture(s, i) for i, s in zip(indices, swapped)], [_described(s) for s in scenes])
    assert result["colour_attribution_accuracy"] == 0 and result["whole_scene_accuracy"] == 0
    assert result["count_accuracy"] == 1 and result["position_accuracy"] == 1
    assert result["object_shape_accuracy"] == 1 and result["object_colour_accuracy"] == 0


def test_an_extra_object_fails_count_though_every_described_object_is_right():
    one_object = [i for i in range(200) if len(_scene(i)) == 1][:10]
    pictures, described = [], []
    for i in one_object:
        scene = _scene(i)
        free = next(p for p in range(9) if p != scene[0].object.position)
        row, column = divmod(free, 3)
        extra = scene[0]._replace(object=scene[0].object._replace(position=free),
                                  x=(column + 0.5) / 3, y=(row + 0.5) / 3)
        pictures.append(_picture(scene + (extra,), i))
        described.append(_described(scene))
    result = score_scenes(pictures, described)
    assert result["every_object_accuracy"] == 1
    assert result["count_accuracy"] == 0 and result["whole_scene_accuracy"] == 0 and result["single_object_accuracy"] == 0


def test_an_object_outside_its_cell_is_wrong_in_place_but_read_for_its_attributes():
    one_object = [i for i in range(200) if len(_scene(i)) == 1][:10]
    pictures, described = [], []
    for i in one_object:
        placed = _scene(i)[0]
        row, column = divmod(placed.object.position, 3)
        moved = placed._replace(x=(((column + 1) % 3) + 0.5) / 3)  # one cell to the right (wrapping)
        pictures.append(_picture((moved,), i))
        described.append(_described((placed,)))
    result = score_scenes(pictures, described)
    assert result["position_accuracy"] == 0 and result["whole_scene_accuracy"] == 0
    assert result["count_accuracy"] == 1
    assert result["object_colour_accuracy"] == 1 and result["object_shape_accuracy"] == 1
