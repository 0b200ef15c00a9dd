"""A transformer trained from scratch by flow matching with train.py's recipe (configs/shapes_mmdit.py
in miniature): VAE, both CLIP encoders and the MMDiT train, the export is a StableDiffusion3Pipeline
folder that diffusers loads and draws the same images from, and it is evaluated like the U-Net."""

import diffusers
import numpy as np
import pytest
import torch

import jdiff
from jdiff.configs import shapes_mmdit, tiny
from jdiff.app import recipe
from jdiff.checkpoint import Checkpoints
from jdiff.errors import ConfigError
from parity import nchw_to_nhwc
from pipeline_test import TOL


def tiny_mmdit_config():
    config, full = tiny.get_config(), shapes_mmdit.get_config()
    config.family, config.scheduler, config.sample.sampler = full.family, full.scheduler, full.sample.sampler
    config.text_2 = full.text_2
    config.text_2.update(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    config.mmdit = full.mmdit
    config.mmdit.update(num_layers=2, num_attention_heads=2, attention_head_dim=8)
    return config


def test_full_config_builds_an_sd3_that_fits_its_data():
    config = shapes_mmdit.get_config()
    from jdiff import families
    from jdiff.app.caption_tokenizer import write_caption_tokenizer
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_caption_tokenizer(folder, ["a red circle", "a small blue square at the top"],
                                            config.text.max_length)
        pipe = families.build(config, tokenizer=tokenizer)
    assert pipe.family is jdiff.FAMILIES["stable-diffusion-3"] and pipe.scheduler.class_name.startswith("FlowMatch")
    cfg = pipe.transformer.config
    assert (cfg.sample_size, cfg.in_channels, cfg.joint_attention_dim, cfg.pooled_projection_dim) == (16, 4, 192, 192)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.settings["max_sequence_length"] == 1
    config.mmdit.patch_size = 3
    with pytest.raises(ConfigError, match="patch_size=3 does not divide the 16x16 latents"):
        families.build(config, tokenizer=tokenizer)


def test_trained_mmdit_exports_an_sd3_folder_that_diffusers_draws_the_same(tmp_path, one_device):
    config = tiny_mmdit_config()
    results = recipe.run(config, tmp_path)
    for key in ("guidance_1", "guidance_4"):
        assert set(results[key]) >= {"colour_accuracy", "shape_accuracy", "position_accuracy"}
    pipe = jdiff.load_pipeline(tmp_path)
    assert pipe.family is jdiff.FAMILIES["stable-diffusion-3"] and "text_encoder_3" not in pipe.modules
    assert pipe.settings["max_sequence_length"] == 1  # read back from model_index.json
    trained = Checkpoints(tmp_path / "diffusion" / "checkpoints").read_meta(6)["model"]["trained"]
    assert sorted(trained) == ["text_encoder", "text_encoder_2", "transformer"]  # all three from scratch

    # without T5, as diffusers loads SD3 without it
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipeline", text_encoder_3=None,
                                                                   tokenizer_3=None)
    prompts = ["a red circle", "a small blue square at the top left"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = reference(prompts, latents=latents, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=1,
                         output_type="np").images
    ours = jdiff.generate(pipe, prompts, steps=3, guidance=4.0, latents=nchw_to_nhwc(latents), mesh=one_device)
    assert ours.shape == (2, 32, 32, 3) and expected.std() > 0.01
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    # diffusers' default 256 zero tokens is another model input: the recorded length matters
    longer = jdiff.generate(pipe, prompts, steps=3, guidance=4.0, latents=nchw_to_nhwc(latents), mesh=one_device,
                            max_sequence_length=256)
    assert np.abs(longer - ours).max() > 0
