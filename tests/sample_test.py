"""sample.py end to end on a tiny random checkpoint: files, metadata, batching, and bad input."""

import json

import numpy as np
import pytest
from PIL import Image

import sample
from jdiff import image_io
from jdiff.app import prompts
from jdiff.errors import ConfigError


@pytest.fixture(scope="module")
def model(tiny_sd_folder):
    return tiny_sd_folder  # make_tiny_sd_pipeline's checkpoint, shared by the session


def test_prompts_file_batches_metadata_and_grid(model, tmp_path, capsys):
    lines = ["a red circle", "# a comment", "", json.dumps({"prompt": "circle", "seed": 42, "negative_prompt": "red"})]
    (tmp_path / "prompts.txt").write_text("\n".join(lines))
    out = tmp_path / "out"
    code = sample.main(["--model", str(model), "--prompts-file", str(tmp_path / "prompts.txt"), "--num-images", "2",
                        "--batch-size", "3", "--steps", "2", "--sampler", "euler", "--seed", "5", "--out", str(out)])
    assert code == 0
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == [f"{i:05d}.png" for i in range(4)]
    meta = [image_io.read_png_parameters(out / name) for name in pngs]
    assert [(m["prompt"], m["seed"], m["negative_prompt"]) for m in meta] == [
        ("a red circle", 5, None), ("a red circle", 6, None), ("circle", 42, "red"), ("circle", 43, "red")]
    assert meta[0]["sampler"] == "euler" and meta[0]["steps"] == 2
    with Image.open(out / "00000.png") as image:
        assert image.size == (32, 32) and "Seed: 5, Size: 32x32" in image.text["parameters"]
    assert (out / "grid.png").is_file()
    printed = capsys.readouterr().out
    assert "compile" in printed and "images/s" in printed
    # the same seed and prompt give the same image whatever batch it was in
    single = tmp_path / "single"
    sample.main(["--model", str(model), "--prompt", "a red circle", "--steps", "2", "--sampler", "euler", "--seed", "6",
                 "--out", str(single)])
    np.testing.assert_allclose(image_io.load_image(single / "00000.png"), image_io.load_image(out / "00001.png"),
                               atol=1 / 255)


def test_image_to_image_and_inpainting_from_files(model, tmp_path):
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "init.png")
    Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8)).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert sample.main(["--model", str(model), "--prompt", "circle", "--steps", "3", "--init-image",
                        str(tmp_path / "init.png"), "--strength", "0.7", "--mask", str(tmp_path / "mask.png"),
                        "--out", str(out)]) == 0
    meta = image_io.read_png_parameters(out / "00000.png")
    assert meta["init_image"].endswith("init.png") and meta["strength"] == 0.7


def test_bad_input_exits_with_a_message(model, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    assert sample.main(["--model", str(model), "--prompts-file", str(tmp_path / "empty.txt")]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "init.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(tmp_path / "mask.png")
    assert sample.main(["--model", str(model), "--prompt", "a", "--init-image", str(tmp_path / "init.png"),
                        "--mask", str(tmp_path / "mask.png")]) == 2
    assert "mask is 24x24 but the image is 32x32" in capsys.readouterr().err
    assert sample.main(["--model", str(tmp_path), "--prompt", "a"]) == 2
    assert "not a diffusion checkpoint" in capsys.readouterr().err
    assert sample.main(["--model", str(model), "--prompt", "a", "--height", "20"]) == 2
    assert "multiples of 8" in capsys.readouterr().err


def test_prompts_file_errors(tmp_path):
    (tmp_path / "bad.txt").write_text('{"prompt": "a", "sead": 1}\n')
    with pytest.raises(ConfigError, match=r"bad.txt:1: a JSON line needs"):
        prompts.read_prompts_file(tmp_path / "bad.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        prompts.read_prompts_file(tmp_path / "missing.txt")
