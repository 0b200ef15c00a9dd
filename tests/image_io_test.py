"""PNG metadata: the `parameters` text other tools read (A1111's form), jdiff's full JSON record,
and reading back either, including PNGs another tool wrote."""

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from jdiff import image_io
from jdiff.errors import ConfigError

IMAGE = np.linspace(0, 1, 24 * 16 * 3).reshape(24, 16, 3)


def test_png_carries_a1111_text_and_the_full_record(tmp_path):
    parameters = {"prompt": "a cat, in a hat", "negative_prompt": "blurry", "seed": 123, "sampler": "dpm++2m_karras",
                  "steps": 25, "guidance": 7.5, "model": "/models/my-sd15/", "eta": 0.0, "lora_scales": {"a": 0.8}}
    image_io.save_png(tmp_path / "x.png", IMAGE, parameters)
    with Image.open(tmp_path / "x.png") as image:
        text = dict(image.text)
    assert text["parameters"] == ('a cat, in a hat\nNegative prompt: blurry\n'
                                  'Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 123, Size: 16x24, '
                                  'Model: my-sd15')
    assert "prompt" not in text  # ComfyUI reads a chunk of that name as its JSON graph
    assert json.loads(text["jdiff"]) == parameters
    assert image_io.read_png_parameters(tmp_path / "x.png") == parameters
    back = image_io.parse_a1111_parameters(text["parameters"])
    assert back == {"prompt": "a cat, in a hat", "negative_prompt": "blurry", "steps": 25, "sampler": "dpm++2m_karras",
                    "guidance": 7.5, "seed": 123, "width": 16, "height": 24, "model": "my-sd15"}


def test_values_with_commas_are_quoted_and_multiline_prompts_survive(tmp_path):
    parameters = {"prompt": "line one\nline two", "negative_prompt": None, "seed": 1, "sampler": "flow_euler",
                  "steps": 4, "guidance": 3.5, "model": "weird, name", "strength": 0.6}
    text = image_io.a1111_parameters(parameters, width=8, height=8)
    assert "Negative prompt" not in text and 'Model: "weird, name"' in text and "Sampler: flow_euler" in text
    assert "Denoising strength: 0.6" in text
    back = image_io.parse_a1111_parameters(text)
    assert (back["prompt"], back["negative_prompt"], back["model"], back["strength"]) == (
        "line one\nline two", None, "weird, name", 0.6)
    # Several prompts (a grid): no single prompt to write in that form, the JSON record only.
    assert image_io.a1111_parameters({"prompts": ["a", "b"], "steps": 2}, 8, 8) is None
    image_io.save_png(tmp_path / "grid.png", IMAGE, {"prompts": ["a", "b"], "steps": 2})
    assert image_io.read_png_parameters(tmp_path / "grid.png") == {"prompts": ["a", "b"], "steps": 2}


def test_reads_what_other_tools_and_older_jdiff_wrote(tmp_path):
    a1111 = ("masterpiece, a fox\nin the snow\nNegative prompt: lowres, bad hands\n"
             "Steps: 30, Sampler: Euler a, Schedule type: Karras, CFG scale: 6, Seed: 42, Size: 512x768, "
             'Model hash: 6ce0161689, Model: v1-5-pruned, Lora hashes: "fox: 1a2b3c", Version: v1.10.1')
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111)
    Image.fromarray(image_io.to_uint8(IMAGE)).save(tmp_path / "a1111.png", pnginfo=info)
    read = image_io.read_png_parameters(tmp_path / "a1111.png")
    assert read == {"prompt": "masterpiece, a fox\nin the snow", "negative_prompt": "lowres, bad hands", "steps": 30,
                    "sampler": "euler_a", "Schedule type": "Karras", "guidance": 6.0, "seed": 42, "width": 512,
                    "height": 768, "Model hash": "6ce0161689", "model": "v1-5-pruned", "Lora hashes": "fox: 1a2b3c",
                    "Version": "v1.10.1"}
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps({"prompt": "old", "seed": 3}))
    Image.fromarray(image_io.to_uint8(IMAGE)).save(tmp_path / "old.png", pnginfo=info)
    assert image_io.read_png_parameters(tmp_path / "old.png") == {"prompt": "old", "seed": 3}
    Image.fromarray(image_io.to_uint8(IMAGE)).save(tmp_path / "bare.png")
    with pytest.raises(ConfigError, match="carries no generation parameters"):
        image_io.read_png_parameters(tmp_path / "bare.png")
    with pytest.raises(ConfigError, match="does not exist"):
        image_io.read_png_parameters(tmp_path / "missing.png")


def test_non_latin_prompts_round_trip(tmp_path):
    parameters = {"prompt": "猫, à la plage", "seed": 0, "steps": 1}
    image_io.save_png(tmp_path / "u.png", IMAGE, parameters)
    assert image_io.read_png_parameters(tmp_path / "u.png") == parameters
    with Image.open(tmp_path / "u.png") as image:
        assert image.text["parameters"].startswith("猫, à la plage\n")
