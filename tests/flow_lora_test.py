"""LoRA for SD3 and Flux: files that diffusers' own save_lora_weights writes for the transformer
and the CLIP encoders load and draw what diffusers' load_lora_weights + set_adapters draws; an
adapter trained by flow matching with train.py's recipe loads in diffusers and draws the same."""

import diffusers
import numpy as np
import pytest
import torch

import jdiff
from flow_training_test import RESOLUTION, finetune_config
from jdiff.app import recipe
from parity import nchw_to_nhwc
from pipeline_test import TOL
from sdxl_finetune_test import write_pictures
from tiny_models import make_tiny_flux_pipeline, make_tiny_sd3_pipeline, write_random_lora

PROMPTS = ["a red circle", "circle"]
# Both streams' attention projections, the feed-forwards, Flux's single-stream MLP and output.
SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.2", "ff_context.net.0.proj")
FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "proj_mlp", "proj_out", "ff.net.2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_lora")
    make_tiny_sd3_pipeline(root / "sd3")
    make_tiny_flux_pipeline(root / "flux")
    return root


def reference_images(cls, folder, lora, scale, latents, **kw):
    reference = cls.from_pretrained(folder)
    reference.load_lora_weights(str(lora), adapter_name="lora")
    reference.set_adapters(["lora"], [scale])
    return reference(PROMPTS, latents=latents, num_inference_steps=3, output_type="np", **kw).images


def test_sd3_lora_file_matches_diffusers(folders, one_device):
    lora = write_random_lora(folders / "sd3", folders / "sd3_lora", seed=5, unet_targets=SD3_TARGETS,
                             text_targets=("q_proj", "v_proj"), scale=0.2)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = reference_images(diffusers.StableDiffusion3Pipeline, folders / "sd3", lora, 0.8, latents,
                                guidance_scale=5.0)
    pipe = jdiff.load_pipeline(folders / "sd3")
    with_lora = jdiff.load_lora_weights(pipe, lora, adapter_name="lora")
    assert set(with_lora.adapters["lora"]) == {"transformer", "text_encoder", "text_encoder_2"}
    ours = jdiff.generate(with_lora, PROMPTS, steps=3, guidance=5.0, latents=nchw_to_nhwc(latents),
                          lora_scales={"lora": 0.8}, mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    plain = jdiff.generate(pipe, PROMPTS, steps=3, guidance=5.0, latents=nchw_to_nhwc(latents), mesh=one_device)
    assert np.abs(plain - ours).max() > 10 * TOL  # the LoRA matters: the comparison means something


def test_flux_lora_file_matches_diffusers(folders, one_device):
    lora = write_random_lora(folders / "flux", folders / "flux_lora", seed=6, unet_targets=FLUX_TARGETS,
                             text_targets=("q_proj", "v_proj"), scale=0.2)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    packed = diffusers.FluxPipeline._pack_latents(latents, 2, 4, 4, 4)
    expected = reference_images(diffusers.FluxPipeline, folders / "flux", lora, 1.0, packed, guidance_scale=3.5,
                                height=RESOLUTION, width=RESOLUTION)
    pipe = jdiff.load_pipeline(folders / "flux")
    with_lora = jdiff.load_lora_weights(pipe, lora, adapter_name="lora")
    assert set(with_lora.adapters["lora"]) == {"transformer", "text_encoder"}
    kw = dict(steps=3, guidance=3.5, height=RESOLUTION, width=RESOLUTION, latents=nchw_to_nhwc(latents),
              mesh=one_device)
    ours = jdiff.generate(with_lora, PROMPTS, lora_scales={"lora": 1.0}, **kw)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    assert np.abs(jdiff.generate(pipe, PROMPTS, **kw) - ours).max() > 10 * TOL


def test_sd3_lora_trained_by_flow_matching_loads_in_diffusers(folders, tmp_path, one_device):
    config = finetune_config(folders / "sd3", write_pictures(tmp_path / "pictures"), steps=3, learning_rate=3e-2,
                             warmup_steps=1, num_devices=1)
    # text targets go to the CLIP encoders only, as diffusers' SD3 LoRA loader reads them (never T5)
    config.lora.update(rank=4, unet_targets=("to_q", "to_v", "add_k_proj", "to_add_out"),
                       text_encoder_targets=("q_proj", "out_proj"))
    recipe.run(config, tmp_path / "run")
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "run" / "pipeline").exists()  # an adapter, not a copy of the model
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = reference_images(diffusers.StableDiffusion3Pipeline, folders / "sd3", tmp_path / "run" / "lora", 1.0,
                                latents, guidance_scale=5.0)
    pipe = jdiff.load_pipeline(folders / "sd3")
    tuned = jdiff.load_lora_weights(pipe, tmp_path / "run" / "lora", adapter_name="lora")
    assert set(tuned.adapters["lora"]) == {"transformer", "text_encoder", "text_encoder_2"}
    kw = dict(steps=3, guidance=5.0, latents=nchw_to_nhwc(latents), mesh=one_device)
    ours = jdiff.generate(tuned, PROMPTS, lora_scales={"lora": 1.0}, **kw)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    assert np.abs(jdiff.generate(pipe, PROMPTS, **kw) - ours).max() > 2 * TOL  # the adapter trained
