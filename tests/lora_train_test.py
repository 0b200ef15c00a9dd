"""LoRA training through train.py's recipe: only the adapters train and are checkpointed, a run
resumed part-way ends where a straight run ends, and diffusers draws the export as jdiff does."""

import diffusers
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

import jdiff
from jdiff.configs import tiny
from jdiff.app import recipe
from jdiff.errors import ConfigError
from parity import nchw_to_nhwc
from pipeline_test import TOL
from tiny_models import write_captioned_pictures

PROMPTS = ["a red circle", "circle"]


def lora_config(base, pictures, **lora):
    config = tiny.get_config()
    config.pretrained = str(base)
    config.stages = "diffusion"
    config.data.update(dataset="folder", folder=str(pictures), caption_dropout=0.2)
    config.lora.update(rank=4, alpha=2.0, text_encoder_targets=("q_proj", "v_proj"), **lora)
    config.diffusion_train.update(steps=4, learning_rate=3e-2, warmup_steps=0, checkpoint_every=2, eval_every=100,
                                  log_every=1)
    config.sample.update(num_prompts=2, steps=2, sampler="ddim")
    return config


@pytest.fixture(scope="module")
def runs(tiny_sd_folder, tmp_path_factory):
    """A straight 4-step LoRA run and the same run stopped after 2 steps and resumed."""
    root = tmp_path_factory.mktemp("lora_train")
    pictures = write_captioned_pictures(root / "pictures", 32, 32)
    recipe.run(lora_config(tiny_sd_folder, pictures), root / "straight")
    config = lora_config(tiny_sd_folder, pictures)
    config.diffusion_train.run_steps = 2
    assert "stopped_early" in recipe.run(config, root / "resumed")
    config.diffusion_train.run_steps = 0
    recipe.run(config, root / "resumed")
    return tiny_sd_folder, pictures, root


def test_only_the_adapters_train_and_are_checkpointed(runs):
    from orbax import checkpoint as ocp

    base, _, root = runs
    step = root / "straight" / "diffusion" / "checkpoints" / "4" / "state"
    tree = ocp.StandardCheckpointer().metadata(step).item_metadata.tree
    saved = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    # params, EMA and both Adam moments of the adapters only; no base weight anywhere.
    others = sorted(k for k in saved if "/lora/" not in k)
    assert others == ["opt_state/1/0/count", "opt_state/1/2/count", "rng", "step"], others
    components = {k.split("/")[2] for k in saved if k.startswith("params/")}
    assert components == {"unet", "text_encoder"}
    assert not (root / "straight" / "pipeline").exists()  # the base model is not exported again
    tensors = safetensors.numpy.load_file(str(root / "straight" / "lora" / "pytorch_lora_weights.safetensors"))
    ups = [v for k, v in tensors.items() if "lora_B" in k]
    assert len(ups) == 32 + 4 and all(np.abs(u).max() > 0 for u in ups)  # 4 transformer blocks x 2 attentions x 4 projections, 2 layers x (q, v); all moved from zero


def test_resumed_run_ends_where_the_straight_run_ends(runs):
    _, _, root = runs
    straight, resumed = (safetensors.numpy.load_file(str(root / name / "lora" / "pytorch_lora_weights.safetensors"))
                         for name in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        np.testing.assert_allclose(resumed[key], straight[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_diffusers_draws_the_trained_lora_as_jdiff_does(runs, one_device):
    base, _, root = runs
    lora = root / "straight" / "lora"
    reference = diffusers.StableDiffusionPipeline.from_pretrained(base)
    reference.load_lora_weights(str(lora), adapter_name="trained")
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = reference(PROMPTS, latents=latents, num_inference_steps=3, output_type="np").images
    pipe = jdiff.load_pipeline(base)
    ours = jdiff.generate(jdiff.load_lora_weights(pipe, lora), PROMPTS, steps=3, latents=nchw_to_nhwc(latents),
                          mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    plain = jdiff.generate(pipe, PROMPTS, steps=3, latents=nchw_to_nhwc(latents), mesh=one_device)
    assert np.abs(plain - ours).max() > 5 * TOL  # training moved the model


def test_bad_lora_settings_get_clear_errors(runs, tmp_path):
    base, pictures, _ = runs
    config = lora_config(base, pictures)
    config.pretrained = ""
    with pytest.raises(ConfigError, match="set config.pretrained"):
        recipe.run(config, tmp_path / "scratch")
    with pytest.raises(ConfigError, match="name no layer of the unet"):
        recipe.run(lora_config(base, pictures, unet_targets=("to_qq",)), tmp_path / "typo")
    config = lora_config(base, pictures)
    config.data.cache_text_embeddings = True
    with pytest.raises(ConfigError, match="cache_text_embeddings cannot be used with LoRA on a text encoder"):
        recipe.run(config, tmp_path / "cached")
