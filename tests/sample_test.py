"""sample.py end to end on a tiny random checkpoint: files, metadata, batching, and bad input."""

import json

import numpy as np
import pytest
from PIL import Image

import jdiff
import sample
from jdiff import image_io, paths
from jdiff.app import batch_generation, prompts
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
                        "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "masked")]) == 2
    assert "mask is 24x24 but the image is 32x32" in capsys.readouterr().err
    assert sample.main(["--model", str(tmp_path), "--prompt", "a"]) == 2
    assert "not a diffusion checkpoint" in capsys.readouterr().err
    assert sample.main(["--model", str(model), "--prompt", "a", "--height", "20", "--out", str(tmp_path / "out")]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    # A run that failed before its first image leaves nothing that holds the folder against the next.
    assert sample.main(["--model", str(model), "--prompt", "a", "--height", "24", "--steps", "1",
                        "--out", str(tmp_path / "out")]) == 0


def test_prompts_file_errors(tmp_path):
    (tmp_path / "bad.txt").write_text('{"prompt": "a", "sead": 1}\n')
    with pytest.raises(ConfigError, match=r"bad.txt:1: a JSON line needs"):
        prompts.read_prompts_file(tmp_path / "bad.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        prompts.read_prompts_file(tmp_path / "missing.txt")
    (tmp_path / "size.txt").write_text('{"prompt": "a", "height": "512"}\n')
    with pytest.raises(ConfigError, match=r"size.txt:1: 'height' must be a positive integer"):
        prompts.read_prompts_file(tmp_path / "size.txt")
    with pytest.raises(ConfigError, match="not WIDTHxHEIGHT"):
        prompts.parse_buckets("512x512,640by384")
    (tmp_path / "second.txt").write_text('{"prompt": "a", "prompt_2": 3}\n')
    with pytest.raises(ConfigError, match=r"second.txt:1: 'prompt_2' must be a string"):
        prompts.read_prompts_file(tmp_path / "second.txt")


def test_other_encoders_prompts_come_from_the_line_else_the_command():
    entries = [{"prompt": "a", "prompt_2": "b"}, {"prompt": "c", "negative_prompt_3": None}]
    jobs = prompts.make_jobs(entries, 1, 0, None, {"prompt_2": "x", "negative_prompt_3": "y", "prompt_3": None})
    assert [dict(j.encoder_prompts) for j in jobs] == [{"prompt_2": "b", "negative_prompt_3": "y"}, {"prompt_2": "x"}]
    assert batch_generation.encoder_prompts(jobs) == {"prompts_2": ["b", "x"], "negative_prompts_3": ["y", None]}
    assert prompts.make_jobs([{"prompt": "a"}], 1, 0, None)[0].encoder_prompts == ()


def test_a_request_goes_to_the_bucket_of_the_nearest_aspect_ratio():
    buckets = prompts.parse_buckets("512x512, 768x512,512x768,1024x1024")  # W x H, as image sizes are written
    assert buckets == [(512, 512), (512, 768), (768, 512), (1024, 1024)]  # (height, width)
    assert prompts.bucket_for(512, 512, buckets) == (512, 512)
    assert prompts.bucket_for(600, 600, buckets) == (1024, 1024)  # the smallest square that covers it
    assert prompts.bucket_for(2048, 2048, buckets) == (1024, 1024)  # none covers it: the largest
    assert prompts.bucket_for(400, 640, buckets) == (512, 768)  # landscape 1.6 -> 1.5
    assert prompts.bucket_for(700, 450, buckets) == (768, 512)  # portrait


def test_fit_scales_and_centre_crops_to_the_asked_size():
    image = np.zeros((32, 48, 3), np.float32)
    image[:, 8:40] = 1.0  # a white square in the middle of a black landscape picture
    square = image_io.fit(image, 16, 16)  # scaled to 16 x 24, then its middle 16 columns
    assert square.shape == (16, 16, 3) and square.min() > 0.9
    assert image_io.fit(image, 32, 48) is image
    assert image_io.fit(image, 40, 56).shape == (40, 56, 3)


def test_mixed_sizes_compile_once_per_bucket(model, tmp_path):
    import jax
    from jdiff import pipeline

    sizes = [(32, 32), (32, 48), (48, 32), (40, 56), (24, 24), (32, 48)]  # (height, width)
    lines = [json.dumps({"prompt": f"a red circle {i}", "height": h, "width": w}) for i, (h, w) in enumerate(sizes)]
    (tmp_path / "prompts.txt").write_text("\n".join(lines))
    common = ["--model", str(model), "--prompts-file", str(tmp_path / "prompts.txt"), "--batch-size", "2",
              "--steps", "2", "--sampler", "euler"]
    jax.clear_caches()
    assert sample.main(common + ["--out", str(tmp_path / "exact")]) == 0
    assert pipeline._generate._cache_size() == 5  # one program per distinct size
    jax.clear_caches()
    assert sample.main(common + ["--buckets", "32x32,48x32,32x48", "--out", str(tmp_path / "buckets")]) == 0
    assert pipeline._generate._cache_size() == 3  # one per bucket
    for folder in ("exact", "buckets"):
        for i, (h, w) in enumerate(sizes):
            with Image.open(tmp_path / folder / f"{i:05d}.png") as image:
                assert image.size == (w, h)
            meta = image_io.read_png_parameters(tmp_path / folder / f"{i:05d}.png")
            assert (meta["height"], meta["width"]) == (h, w)
    buckets = [image_io.read_png_parameters(tmp_path / "buckets" / f"{i:05d}.png").get("bucket") for i in range(6)]
    assert buckets == [None, None, None, "48x32", "32x32", None]  # 40x56 drawn at 32x48, 24x24 at 32x32
    # an image drawn at its own bucket's size is the one drawn without buckets
    np.testing.assert_array_equal(image_io.load_image(tmp_path / "buckets" / "00001.png"),
                                  image_io.load_image(tmp_path / "exact" / "00001.png"))
    assert (tmp_path / "buckets" / "grid.png").is_file()


def _folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_rerun_after_an_interruption_writes_what_an_uninterrupted_run_writes(model, tmp_path, monkeypatch, capsys):
    from jdiff.app import batch_generation

    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na green triangle\n")
    command = ["--model", str(model), "--prompts-file", str(tmp_path / "prompts.txt"), "--num-images", "4",
               "--batch-size", "4", "--steps", "2", "--sampler", "euler"]
    assert sample.main(command + ["--out", str(tmp_path / "straight")]) == 0
    straight = _folder_bytes(tmp_path / "straight")
    assert sorted(straight) == [f"{i:05d}.png" for i in range(12)] + ["grid.png", "manifest.jsonl", "run.json"]
    manifest = [json.loads(line) for line in straight["manifest.jsonl"].decode().splitlines()]
    assert [m["file"] for m in manifest] == [f"{i:05d}.png" for i in range(12)]
    assert {k: manifest[5][k] for k in ("prompt", "seed", "sampler", "steps", "height", "width")} == {
        "prompt": "a blue square", "seed": 5, "sampler": "euler", "steps": 2, "height": 32, "width": 32}

    # Interrupted in the middle of the second batch's files (as a kill would leave it, with a
    # half-written temporary file), then the same command again.
    out = tmp_path / "interrupted"
    save_png, written = image_io.save_png, []

    def save_then_stop(path, image, parameters):
        if len(written) == 6:
            paths.temporary_name(path).write_bytes(b"\x89PNG truncated")
            raise KeyboardInterrupt
        save_png(path, image, parameters)
        written.append(path.name)

    monkeypatch.setattr(image_io, "save_png", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        sample.main(command + ["--out", str(out)])
    monkeypatch.setattr(image_io, "save_png", save_png)
    generated = []
    generate_batch = batch_generation.generate_batch
    monkeypatch.setattr(batch_generation, "generate_batch",
                        lambda pipe, prompts, *a, **k: generated.append(prompts) or generate_batch(pipe, prompts, *a, **k))
    capsys.readouterr()
    assert sample.main(command + ["--out", str(out)]) == 0
    assert len(generated) == 2  # the first batch was whole on disk; the second and third are made again
    assert "4 kept from an earlier run" in capsys.readouterr().out
    # Byte for byte: images, their metadata, the manifest and the grid (the rerun's own write of
    # 00006.png replaced the stray temporary file).
    assert _folder_bytes(out) == straight

    # A different command is refused rather than mixed in (other seeds; another compute dtype);
    # --overwrite starts afresh and removes only the earlier run's own files.
    assert sample.main(command + ["--seed", "9", "--out", str(out)]) == 2
    assert "holds images of a different run (it differs in jobs_sha256)" in capsys.readouterr().err
    assert sample.main(command + ["--dtype", "bfloat16", "--out", str(out)]) == 2
    assert "it differs in settings" in capsys.readouterr().err
    (out / "20240101.png").write_bytes(b"a photo of the user's")
    (out / "notes.txt").write_text("the user's")
    assert sample.main(command[:5] + ["1"] + command[6:] + ["--seed", "9", "--out", str(out), "--overwrite"]) == 0
    assert image_io.read_png_parameters(out / "00000.png")["seed"] == 9
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "20240101.png",
                                                     "grid.png", "manifest.jsonl", "notes.txt", "run.json"]


def test_memory_does_not_grow_with_the_number_of_images(model, tmp_path):
    """2,000 images at 32x32 are 24.6 MB as float32. Measured here: a run that streams them peaks at
    5.0 MB of traced allocations; the same loop keeping every batch (as sample.py once did, for its
    grid) peaked at 29.3 MB. The bound sits between."""
    import tracemalloc

    from jdiff.app import batch_generation

    pipe = jdiff.load_pipeline(model)
    settings = dict(sampler="euler", steps=1, guidance=1.0)
    jobs = prompts.make_jobs([{"prompt": "a red circle"}], 2000, 0, None)
    batch_generation.run(pipe, jobs[:100], tmp_path / "warm", 100, settings)  # compile outside the measurement
    tracemalloc.start()
    try:
        stats = batch_generation.run(pipe, jobs, tmp_path / "out", 100, settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.images == 2000 and len(list((tmp_path / "out").glob("0*.png"))) == 2000
    assert peak < 8e6, f"peak traced memory {peak / 1e6:.1f} MB"


@pytest.mark.slow
def test_sigkill_part_way_then_the_same_command_writes_what_an_uninterrupted_run_writes(model, tmp_path):
    """A real kill (no cleanup runs in the killed process), in a subprocess as a user runs it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from compile_flags import xla_flags
    from tiny_models import ROOT

    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na green triangle\n")
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    if os.environ.get("JDIFF_TEST_COMPILE_CACHE"):
        env.update(JAX_COMPILATION_CACHE_DIR=os.environ["JDIFF_TEST_COMPILE_CACHE"],
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def command(out):
        return [sys.executable, str(ROOT / "sample.py"), "--model", str(model), "--prompts-file",
                str(tmp_path / "prompts.txt"), "--num-images", "40", "--batch-size", "4", "--steps", "2",
                "--sampler", "euler", "--out", str(out)]

    def run(out):
        done = subprocess.run(command(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    run(tmp_path / "straight")
    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and len(list(out.glob("0*.png"))) < 10:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list(out.glob("0*.png")))
    assert 10 <= written < 120, f"the kill came at {written} of 120 images: not part-way"
    summary = run(out)
    assert "kept from an earlier run" in summary
    assert _folder_bytes(out) == _folder_bytes(tmp_path / "straight")
