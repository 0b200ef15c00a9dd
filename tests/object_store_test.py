"""Workdirs, model folders, LoRA files, image folders and sample outputs in an object store: a fake
`gs://` (tests/fake_object_store.py) that refuses renames and appends as GCS does, against the same
work on local paths."""

import json
import os
import warnings

import jax
import numpy as np
import pytest

import jdiff
import sample
from fake_object_store import ObjectStoreViolation, fake_gcs_store, local_path
from jdiff import image_io, paths, train_lib
from jdiff.app import recipe, stages
from jdiff.app.shapes_tfds import load_shapes
from jdiff.configs import tiny
from jdiff.data import make_loader, to_model_range
from jdiff.data.image_folder import ImageFolder
from jdiff.errors import ConfigError
from tiny_models import write_captioned_pictures, write_random_lora


@pytest.fixture
def gcs(tmp_path):
    with fake_gcs_store(tmp_path / "store") as bucket:
        yield bucket
    # A URL handed to a library that takes it for a local name leaves a "gs:" folder in the cwd.
    assert not os.path.exists("gs:"), "something wrote a gs:// path to the local disk"


def _tree_bytes(folder) -> dict:
    """{relative name: bytes} of every file under a local folder."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, folder)] = open(full, "rb").read()
    return out


def _assert_same_params(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_the_fake_store_refuses_what_gcs_cannot_do(gcs):
    file = paths.as_path(gcs) / "a" / "b.txt"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("x")
    with pytest.raises(ObjectStoreViolation):
        file.rename(file.parent / "c.txt")
    with pytest.raises(ObjectStoreViolation):
        file.open("a")
    assert open(local_path(str(file))).read() == "x"


def test_paths_write_whole_files_and_move_folders_without_renames(gcs, tmp_path):
    for root in (paths.as_path(gcs) / "w", paths.as_path(tmp_path) / "w"):
        root.mkdir(parents=True, exist_ok=True)
        paths.write_text(root / "a.json", "{}")
        paths.write_file(root / "b.bin", lambda name: open(name, "wb").write(b"\0" * 10))
        assert sorted(p.name for p in root.iterdir()) == ["a.json", "b.bin"]  # no temporary file left
        (root / "sub" / ".hidden").mkdir(parents=True)
        (root / "sub" / "c.txt").write_text("c")
        (root / "sub" / ".hidden" / "d.txt").write_text("d")
        assert sorted(p.name for p in paths.visible_files(root)) == ["a.json", "b.bin", "c.txt"]
        with paths.local_copy(root) as local:
            assert _tree_bytes(local)["sub/c.txt"] == b"c"
        paths.move_tree(root / "sub", paths.unused_name(root, "moved"))
        assert not (root / "sub").exists() and (root / "moved" / "c.txt").read_text() == "c"
        assert paths.unused_name(root, "moved").name == "moved.1"


def test_pipeline_and_lora_round_trip_through_the_store(gcs, tiny_sd_folder, tmp_path):
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    remote = gcs + "/models/tiny"
    jdiff.save_pipeline(pipe, remote)
    jdiff.save_pipeline(pipe, remote)  # over an earlier export: replaced in place, never renamed
    loaded = jdiff.load_pipeline(remote)
    _assert_same_params(loaded.params, pipe.params)
    assert loaded.source == remote
    # The store holds the folder diffusers reads.
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(local_path(remote))
    assert list(reference.unet.config.block_out_channels) == list(pipe.unet.config.block_out_channels)

    lora_local = write_random_lora(tiny_sd_folder, tmp_path / "lora", seed=3)
    paths.copy_tree(lora_local, gcs + "/lora")
    from_store = jdiff.load_lora_weights(pipe, gcs + "/lora", adapter_name="a")
    from_disk = jdiff.load_lora_weights(pipe, lora_local, adapter_name="a")
    _assert_same_params(from_store.adapters, from_disk.adapters)
    jdiff.save_lora_weights(from_store, gcs + "/saved_lora", adapter_name="a")
    _assert_same_params(jdiff.load_lora_weights(pipe, gcs + "/saved_lora", adapter_name="a").adapters,
                        from_disk.adapters)


def test_image_folder_in_the_store_reads_as_on_disk(gcs, tmp_path):
    write_captioned_pictures(tmp_path / "pictures", 40, 48, count=4)
    paths.copy_tree(tmp_path / "pictures", gcs + "/pictures")
    on_disk, in_store = ImageFolder(tmp_path / "pictures", 32), ImageFolder(gcs + "/pictures", 32)
    assert len(in_store) == len(on_disk) == 4
    for i in range(4):
        a, b = on_disk[i], in_store[i]
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_shapes_data_cannot_live_in_the_store(gcs):
    with pytest.raises(ConfigError, match="local"):
        load_shapes(gcs + "/data", "train", num_train=64, num_test=16)


def _vae_run(workdir, data_dir, **section):
    config = tiny.get_config()
    config.vae_train.update(log_every=1, **section)
    source = load_shapes(data_dir, "train", num_train=64, num_test=16)
    test_images = to_model_range(np.stack([source[i]["image"] for i in range(4)]))
    stage = stages.vae_stage(config, test_images)
    loader = make_loader(source, batch_size=config.vae_train.batch_size, seed=0)
    return train_lib.train(stage, config.vae_train, workdir, loader, total_batch=config.vae_train.batch_size)


def test_training_in_the_store_resumes_exactly_and_sets_a_damaged_checkpoint_aside(gcs, tmp_path, tiny_shapes_dir):
    straight = _vae_run(tmp_path / "local", tiny_shapes_dir, steps=6)
    workdir = gcs + "/vae"
    first = _vae_run(workdir, tiny_shapes_dir, steps=6, run_steps=3)
    second = _vae_run(workdir, tiny_shapes_dir, steps=6)
    assert [h["step"] for h in second.history] == [4, 5, 6]
    np.testing.assert_allclose([h["loss"] for h in first.history + second.history],
                               [h["loss"] for h in straight.history], rtol=1e-6)
    checkpoints = local_path(workdir + "/checkpoints")
    assert sorted(n for n in os.listdir(checkpoints) if n.isdigit()) == ["3", "6"]
    assert os.path.isfile(os.path.join(checkpoints, "6", "commit_success.txt"))  # orbax's GCS commit marker
    events = os.listdir(local_path(workdir + "/tensorboard"))
    assert events and all(name.startswith("events.out.tfevents.") for name in events)

    # Damage the newest step: it is copied aside (no rename on an object store) and step 3 is used.
    for dirpath, _, files in os.walk(os.path.join(checkpoints, "6", "state")):
        for name in files:
            if name != "commit_success.txt":
                open(os.path.join(dirpath, name), "wb").write(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _vae_run(workdir, tiny_shapes_dir, steps=6)
    assert any("cannot be read" in str(w.message) for w in caught)
    assert [h["step"] for h in again.history] == [4, 5, 6]
    np.testing.assert_allclose([h["loss"] for h in again.history], [h["loss"] for h in second.history], rtol=1e-6)
    assert os.path.isdir(os.path.join(checkpoints, "6.unreadable", "state"))


@pytest.mark.slow
def test_whole_recipe_with_its_workdir_in_the_store(gcs, tmp_path, monkeypatch):
    monkeypatch.setenv("JDIFF_DATA_DIR", str(tmp_path / "data_cache"))
    config = tiny.get_config()
    config.diffusion_train.run_steps = 3  # stops half-way; the same command then resumes
    workdir = gcs + "/run"
    assert "stopped_early" in recipe.run(config, workdir)
    results = recipe.run(config, workdir)
    assert set(results["guidance_4"]) >= {"colour_accuracy", "shape_accuracy"}
    assert os.path.isdir(tmp_path / "data_cache")  # the shapes set was built locally ...
    assert not os.path.exists(local_path(workdir + "/data"))  # ... not in the store
    store = local_path(workdir)
    for name in ("config.json", "evaluation.json", "samples/grid.png", "pipeline/model_index.json",
                 "vae/export/config.json", "tokenizer/vocab.json"):
        assert os.path.isfile(os.path.join(store, name)), name
    assert json.load(open(os.path.join(store, "evaluation.json"))) == results
    pipe = jdiff.load_pipeline(workdir)  # the workdir stands for its exported pipeline
    _assert_same_params(pipe.params, jdiff.load_pipeline(os.path.join(store, "pipeline")).params)


def test_sample_py_writes_and_resumes_in_the_store(gcs, tiny_sd_folder, tmp_path):
    paths.copy_tree(tiny_sd_folder, gcs + "/model")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    command = ["--model", gcs + "/model", "--prompts-file", str(tmp_path / "prompts.txt"), "--num-images", "3",
               "--batch-size", "4", "--steps", "2", "--sampler", "euler"]
    assert sample.main(command + ["--out", str(tmp_path / "local")]) == 0
    out = gcs + "/samples"
    assert sample.main(command + ["--out", out]) == 0
    on_disk, in_store = _tree_bytes(tmp_path / "local"), _tree_bytes(local_path(out))
    assert sorted(in_store) == [f"{i:05d}.png" for i in range(6)] + ["grid.png", "manifest.jsonl", "run.json"]
    # Byte for byte the same files (the model's name in their metadata aside).
    assert {k: v for k, v in in_store.items() if k.endswith(".png")}.keys() == \
        {k for k in on_disk if k.endswith(".png")}
    manifest = [json.loads(line) for line in in_store["manifest.jsonl"].decode().splitlines()]
    assert [m["model"] for m in manifest] == [gcs + "/model"] * 6
    reference = [json.loads(line) for line in on_disk["manifest.jsonl"].decode().splitlines()]
    assert [{**m, "model": None} for m in manifest] == [{**m, "model": None} for m in reference]
    for i in range(6):
        np.testing.assert_array_equal(image_io.load_image(f"{out}/{i:05d}.png"),
                                      image_io.load_image(tmp_path / "local" / f"{i:05d}.png"))
    # A rerun keeps every image; a lost image is made again, the same bytes.
    os.remove(os.path.join(local_path(out), "00004.png"))
    assert sample.main(command + ["--out", out]) == 0
    assert _tree_bytes(local_path(out)) == in_store
