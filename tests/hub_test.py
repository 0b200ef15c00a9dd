"""Loading by Hugging Face repo id from the local cache (offline), and diffusers' weight variants."""

import shutil

import numpy as np
import pytest
import safetensors.numpy

import jdiff
from jdiff.errors import CheckpointError
from parity import same_params

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(tmp_path, source, repo="org/tiny", refs=("main",)):
    """The layout `hf download` leaves: models--org--name/{refs/<name> -> commit, snapshots/<commit>/}."""
    cache = tmp_path / "hub"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir()
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(COMMIT)
    return cache


def test_a_repo_id_loads_from_the_cache_at_a_revision(tmp_path, tiny_sd_folder):
    cache = fake_cache(tmp_path, tiny_sd_folder, refs=("main", "v1"))
    local = jdiff.load_pipeline(tiny_sd_folder)
    for revision in (None, "v1", COMMIT):
        pipe = jdiff.load_pipeline("org/tiny", cache_dir=cache, revision=revision)
        assert pipe.source == "org/tiny" + (f"@{revision}" if revision else "")  # the PNG's Model: field
        assert same_params(pipe.params, local.params)
    with pytest.raises(CheckpointError, match=r"holds no snapshot of that repo at revision 'v2'.*"
                                              r"hf download org/tiny --revision v2"):
        jdiff.load_pipeline("org/tiny", cache_dir=cache, revision="v2")
    with pytest.raises(CheckpointError, match=r"'org/other' is not a folder, and the Hugging Face cache"):
        jdiff.load_pipeline("org/other", cache_dir=cache)
    with pytest.raises(CheckpointError, match="does not exist"):  # not a repo id: an ordinary missing folder
        jdiff.load_pipeline(tmp_path / "no" / "such" / "folder")


def test_a_variant_loads_its_own_weight_files(tmp_path, tiny_sd_folder):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_folder, folder)
    plain = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.numpy.load_file(str(plain))
    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    safetensors.numpy.save_file(half, str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    default = jdiff.load_pipeline(folder)
    with pytest.warns(UserWarning, match="has no 'fp16' weights"):  # the VAE and text encoder: their default files
        fp16 = jdiff.load_pipeline(folder, variant="fp16")
    assert same_params(default.params["unet"], jdiff.load_pipeline(tiny_sd_folder).params["unet"])
    assert not same_params(fp16.params["unet"], default.params["unet"])  # rounded to float16
    leaf = lambda p: p["unet"]["conv_in"]["kernel"]  # noqa: E731
    np.testing.assert_array_equal(leaf(fp16.params), np.asarray(leaf(default.params), np.float16).astype(np.float32))
    assert same_params(fp16.params["vae"], default.params["vae"])
    # A pipeline with no component in that variant is refused (as diffusers does).
    with pytest.raises(CheckpointError, match=r"has no 'fp16' variant: no component folder holds"):
        jdiff.load_pipeline(tiny_sd_folder, variant="fp16")
    # A download of the variant only (no plain file) loads without naming it.
    plain.unlink()
    assert same_params(jdiff.load_pipeline(folder).params["unet"], fp16.params["unet"])
