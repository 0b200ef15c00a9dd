"""Flux through generate() against diffusers' Flux pipelines on the same random weights and noise:
dev (guidance embedding, dynamic shifting) and schnell, image-to-image, and a saved folder."""

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jdiff
from jdiff import samplers, schedules
from jdiff.errors import CheckpointError
from parity import nchw_to_nhwc
from pipeline_test import TOL, patch_reference_noise
from tiny_models import make_tiny_flux_pipeline

PROMPTS = ["a red circle", "circle"]


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_flux_dev")
    return folder, make_tiny_flux_pipeline(folder, dev=True), jdiff.load_pipeline(folder)


def noise(seed, height, width, batch=2):
    """NCHW latent noise for an image of height x width pixels (factor 8, 4 channels)."""
    return torch.randn(batch, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def packed(latents):
    b, c, h, w = latents.shape
    return diffusers.FluxPipeline._pack_latents(latents, b, c, h, w)


def test_loads_as_flux(dev):
    folder, _, pipe = dev
    assert pipe.family is jdiff.FAMILIES["flux"]
    assert set(pipe.modules) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert jdiff.checkpoint_sampling(pipe) == ("flow_euler", 28) and pipe.default_size == 1024
    half = jdiff.load_pipeline(folder, dtype=jnp.bfloat16)
    assert half.transformer.dtype == half.text_encoder_2.dtype == jnp.bfloat16


def test_dynamic_shift_levels_equal_diffusers(dev):
    """mu from the token count, on FluxPipeline's linspace levels, for several image sizes."""
    _, reference, pipe = dev
    for height, width, steps in ((32, 32, 4), (64, 32, 7), (64, 64, 3)):
        options = pipe.family.levels_options(pipe, steps, height, width)
        plan = samplers.make_plan("flow_euler", pipe.scheduler.config, steps, explicit=pipe.scheduler.explicit,
                                  levels_options=options)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(reference.scheduler.config)
        scheduler.set_timesteps(sigmas=options["sigmas"], mu=options["mu"])
        np.testing.assert_allclose(plan.sigmas[:steps + 1], scheduler.sigmas.numpy(), rtol=0, atol=1e-7)
        np.testing.assert_allclose(plan.timesteps[:steps], scheduler.timesteps.numpy(), rtol=1e-6)
    assert schedules.flow_shift_mu(pipe.scheduler.config, 4) == pytest.approx(0.5)


@pytest.mark.parametrize("height,width,guidance,length", [(32, 32, 3.5, None), (64, 32, 1.0, 3)])
def test_dev_text_to_image_matches_diffusers(dev, height, width, guidance, length, one_device):
    _, reference, pipe = dev
    latents = noise(0, height, width)
    kw = {} if length is None else {"max_sequence_length": length}  # 3 cuts "a red circle" in T5
    expected = reference(PROMPTS, latents=packed(latents), height=height, width=width, num_inference_steps=3,
                         guidance_scale=guidance, output_type="np", **kw).images
    ours = jdiff.generate(pipe, PROMPTS, steps=3, guidance=guidance, height=height, width=width,
                          latents=nchw_to_nhwc(latents), mesh=one_device, **kw)
    assert ours.shape == expected.shape == (2, height, width, 3)
    assert 0.02 < expected.std()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_schnell_matches_diffusers_and_ignores_guidance(tmp_path, one_device):
    reference = make_tiny_flux_pipeline(tmp_path, dev=False)
    pipe = jdiff.load_pipeline(tmp_path)
    latents = noise(1, 32, 32)
    expected = reference(PROMPTS, latents=packed(latents), height=32, width=32, num_inference_steps=2,
                         guidance_scale=0.0, output_type="np").images
    for guidance in (0.0, 3.5):
        ours = jdiff.generate(pipe, PROMPTS, steps=2, guidance=guidance, height=32, width=32,
                              latents=nchw_to_nhwc(latents), mesh=one_device)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_image_to_image_matches_diffusers(dev, monkeypatch, one_device):
    folder, _, pipe = dev
    reference = diffusers.FluxImg2ImgPipeline.from_pretrained(folder)
    image = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    latents = noise(2, 32, 32)
    patch_reference_noise(monkeypatch, "diffusers.pipelines.flux.pipeline_flux_img2img", latents)  # packed there
    expected = reference(PROMPTS, image=torch.tensor(image).permute(0, 3, 1, 2), height=32, width=32, strength=0.7,
                         num_inference_steps=5, guidance_scale=3.0, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, init_image=image, strength=0.7, steps=5, guidance=3.0,
                          latents=nchw_to_nhwc(latents), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_saved_folder_loads_in_diffusers_and_errors(dev, tmp_path, one_device):
    folder, reference, pipe = dev
    jdiff.save_pipeline(pipe, tmp_path / "saved")
    reloaded = diffusers.FluxPipeline.from_pretrained(tmp_path / "saved")
    kw = dict(latents=packed(noise(3, 32, 32)), height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
              output_type="np")
    np.testing.assert_allclose(reloaded(PROMPTS, **kw).images, reference(PROMPTS, **kw).images, rtol=0, atol=1e-5)
    assert jdiff.load_pipeline(tmp_path / "saved").family is pipe.family
    with pytest.raises(jdiff.ConfigError, match="multiple of 16"):
        jdiff.generate(pipe, PROMPTS, steps=1, height=40, width=32)
    import shutil

    shutil.rmtree(tmp_path / "saved" / "text_encoder_2")
    with pytest.raises(CheckpointError, match="lacks text_encoder_2/"):
        jdiff.load_pipeline(tmp_path / "saved")


def test_true_cfg_with_negative_prompts_matches_diffusers(dev, one_device):
    _, reference, pipe = dev
    latents = noise(4, 32, 32)
    expected = reference(PROMPTS, negative_prompt=["red", "blue"], true_cfg_scale=4.0, latents=packed(latents),
                         height=32, width=32, num_inference_steps=3, guidance_scale=3.5, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, negative_prompts=["red", "blue"], true_cfg_scale=4.0, steps=3, guidance=3.5,
                          height=32, width=32, latents=nchw_to_nhwc(latents), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    plain = jdiff.generate(pipe, PROMPTS, steps=3, guidance=3.5, height=32, width=32, latents=nchw_to_nhwc(latents),
                           mesh=one_device)
    assert np.abs(plain - ours).max() > 4 * TOL  # the negative prompts change the images
    # prompts_2 and negative_prompts_2 reach T5, as diffusers' prompt_2 and negative_prompt_2
    expected = reference(PROMPTS, prompt_2=["a blue square", "red"], negative_prompt=["red", "blue"],
                         negative_prompt_2="circle", true_cfg_scale=4.0, latents=packed(latents), height=32, width=32,
                         num_inference_steps=3, guidance_scale=3.5, output_type="np").images
    second = jdiff.generate(pipe, PROMPTS, prompts_2=["a blue square", "red"], negative_prompts=["red", "blue"],
                            negative_prompts_2="circle", true_cfg_scale=4.0, steps=3, guidance=3.5, height=32,
                            width=32, latents=nchw_to_nhwc(latents), mesh=one_device)
    np.testing.assert_allclose(second, expected, rtol=0, atol=TOL)
    assert np.abs(second - ours).max() > 1e-3
    with pytest.raises(jdiff.ConfigError, match="needs negative_prompts"):
        jdiff.generate(pipe, PROMPTS, true_cfg_scale=4.0, steps=1, height=32, width=32)


def test_steps_guidance_scales_and_seeds_compile_once(dev, one_device):
    import jax

    _, _, pipe = dev
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    kw = dict(negative_prompts=["red", ""], true_cfg_scale=2.0, steps=2, guidance=3.5, height=32, width=32, seed=0,
              mesh=one_device)
    first_images = jdiff.generate(pipe, PROMPTS, **kw)
    first = len(compiles)
    results = [jdiff.generate(pipe, PROMPTS, **(kw | change))
               for change in (dict(steps=5), dict(guidance=2.0), dict(true_cfg_scale=5.0), dict(seed=3))]
    assert len(compiles) == first, "a traced setting caused a recompilation"
    assert all(np.abs(r - first_images).max() > 0 for r in results)


def test_sample_py_draws_what_generate_draws_with_flux_options(dev, tmp_path):
    import sample
    from jdiff import image_io

    folder, _, pipe = dev
    out = tmp_path / "out"
    assert sample.main(["--model", str(folder), "--prompt", "a red circle", "--negative-prompt", "blue",
                        "--true-cfg-scale", "2.0", "--max-sequence-length", "16", "--steps", "2", "--height", "32",
                        "--width", "32", "--seed", "3", "--out", str(out)]) == 0
    meta = image_io.read_png_parameters(out / "00000.png")
    assert meta["true_cfg_scale"] == 2.0 and meta["max_sequence_length"] == 16 and meta["sampler"] == "flow_euler"
    expected = jdiff.generate(pipe, ["a red circle"], negative_prompts=["blue"], true_cfg_scale=2.0,
                              max_sequence_length=16, steps=2, height=32, width=32, seed=3)
    np.testing.assert_allclose(image_io.load_image(out / "00000.png"), expected[0], atol=1 / 255)


def test_weights_sharded_over_fsdp_and_tensor_draw_the_same(dev):
    """Flux's 12B parameters do not fit one accelerator: generate() with the transformer and T5
    split over fsdp x tensor (8 fake devices) draws what one device draws."""
    import jax
    from jax.sharding import Mesh, PartitionSpec

    from jdiff import sharding

    _, _, pipe = dev
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    kw = dict(steps=2, guidance=3.5, height=32, width=32, seed=5)
    split = jdiff.generate(pipe, PROMPTS, mesh=mesh, **kw)
    placed = pipe._placed[next(iter(pipe._placed))]
    q = placed["transformer"]["transformer_blocks_0"]["attn"]["add_q_proj"]["kernel"]
    assert q.sharding.spec == PartitionSpec("fsdp", "tensor")  # the text stream's projections follow the heads
    one = jdiff.generate(pipe, PROMPTS, mesh=Mesh(jax.devices()[:1], ("data",)), **kw)
    np.testing.assert_allclose(split, one, rtol=0, atol=1e-5)
