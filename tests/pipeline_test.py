"""generate() against diffusers' Stable Diffusion pipelines on the same random weights and noise."""

import importlib

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import jdiff
from jdiff.errors import CheckpointError, ConfigError
from parity import nchw_to_nhwc
from tiny_models import make_tiny_sd_pipeline

PROMPTS = ["a red circle", "circle"]
TOL = 2 / 255


@pytest.fixture(scope="module")
def tiny(tiny_sd_folder):
    from diffusers import StableDiffusionPipeline

    # the session's make_tiny_sd_pipeline(folder), read as make_tiny_sd_pipeline returns it
    return tiny_sd_folder, StableDiffusionPipeline.from_pretrained(tiny_sd_folder), jdiff.load_pipeline(tiny_sd_folder)


def reference_latents(batch=2, seed=0):
    return torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


def with_scheduler(reference, name):
    import diffusers

    cls = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}[name]
    reference.scheduler = getattr(diffusers, cls).from_config(reference.scheduler.config)
    return reference


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpm++2m"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_text_to_image_matches_diffusers(tiny, sampler, guidance, one_device):
    folder, reference, pipe = tiny
    latents = reference_latents()
    expected = with_scheduler(reference, sampler)(PROMPTS, latents=latents, num_inference_steps=3,
                                                  guidance_scale=guidance, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, sampler=sampler, steps=3, guidance=guidance,
                          latents=nchw_to_nhwc(latents), mesh=one_device)
    assert ours.shape == expected.shape == (2, 32, 32, 3)
    assert 0.02 < expected.std()  # the images are not flat: the comparison means something
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_negative_prompts_and_guidance_rescale_match_diffusers(tiny, one_device):
    folder, reference, pipe = tiny
    latents = reference_latents(seed=1)
    kw = dict(negative_prompt=["circle", "red"], guidance_scale=5.0, guidance_rescale=0.7)
    expected = with_scheduler(reference, "ddim")(PROMPTS, latents=latents, num_inference_steps=3, output_type="np",
                                                 **kw).images
    ours = jdiff.generate(pipe, PROMPTS, negative_prompts=["circle", "red"], guidance=5.0, guidance_rescale=0.7,
                          steps=3, latents=nchw_to_nhwc(latents), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    plain = jdiff.generate(pipe, PROMPTS, guidance=5.0, steps=3, latents=nchw_to_nhwc(latents), mesh=one_device)
    assert np.abs(plain - ours).max() > 2 * TOL


def init_image_and_mask(size=32):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    image = np.stack([yy, xx, 0.5 + 0.3 * np.sin(6 * xx)], -1) + 0.1 * rng.random((size, size, 3))
    image = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[8:24, 4:20] = 255
    return image, Image.fromarray(mask)


def patch_reference_noise(monkeypatch, module, noise):
    """The reference pipeline draws its noise with `randn_tensor` and encodes images with a
    posterior sample; give it our noise and the posterior mean, which jdiff uses."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(importlib.import_module(module), "randn_tensor", lambda *a, **k: noise.clone())
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_image_to_image_matches_diffusers(tiny, sampler, monkeypatch, one_device):
    from diffusers import StableDiffusionImg2ImgPipeline

    folder, reference, pipe = tiny
    noise = reference_latents(seed=2)
    patch_reference_noise(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img", noise)
    image, _ = init_image_and_mask()
    img2img = StableDiffusionImg2ImgPipeline(**with_scheduler(reference, sampler).components)
    expected = img2img(PROMPTS, image=image, strength=0.6, num_inference_steps=5, guidance_scale=4.0,
                       output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, sampler=sampler, init_image=image, strength=0.6, steps=5, guidance=4.0,
                          latents=nchw_to_nhwc(noise), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_inpainting_with_an_ordinary_unet_matches_diffusers(tiny, monkeypatch, one_device):
    from diffusers import StableDiffusionInpaintPipeline

    folder, reference, pipe = tiny
    noise = reference_latents(seed=3)
    patch_reference_noise(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint", noise)
    image, mask = init_image_and_mask()
    inpaint = StableDiffusionInpaintPipeline(**with_scheduler(reference, "ddim").components)
    expected = inpaint(PROMPTS, image=image, mask_image=mask, strength=0.75, num_inference_steps=4,
                       guidance_scale=6.0, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, init_image=image, mask=mask, strength=0.75, steps=4, guidance=6.0,
                          latents=nchw_to_nhwc(noise), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_inpainting_unet_with_nine_channels_matches_diffusers(tmp_path, monkeypatch, one_device):
    folder = tmp_path / "inpaint"
    reference = make_tiny_sd_pipeline(folder, in_channels=9, seed=5)
    pipe = jdiff.load_pipeline(folder)
    noise = reference_latents(seed=4)
    patch_reference_noise(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint", noise)
    image, mask = init_image_and_mask()
    expected = with_scheduler(reference, "euler")(PROMPTS, image=image, mask_image=mask, strength=1.0,
                                                  num_inference_steps=3, guidance_scale=3.0, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, sampler="euler", init_image=image, mask=mask, strength=1.0, steps=3,
                          guidance=3.0, latents=nchw_to_nhwc(noise), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_lcm_with_guidance_embedding_matches_diffusers(tmp_path, monkeypatch, one_device):
    """An LCM-distilled U-Net (time_cond_proj_dim) gets the guidance scale as an input and no
    unconditional pass; LCM's per-step noise is injected into the reference."""
    from diffusers import LCMScheduler

    from jdiff import samplers

    folder = tmp_path / "lcm"
    reference = make_tiny_sd_pipeline(folder, time_cond_proj_dim=32, seed=7)
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    pipe = jdiff.load_pipeline(folder)
    keys = jax.vmap(jax.random.key)(np.array([0, 1], np.uint32))
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 1)
    calls = iter(range(100))
    noise = lambda *a, **k: torch.from_numpy(
        np.array(samplers.step_noise(step_keys, next(calls), np.zeros((2, 4, 4, 4), np.float32))).transpose(0, 3, 1, 2))
    monkeypatch.setattr(importlib.import_module("diffusers.schedulers.scheduling_lcm"), "randn_tensor", noise)
    latents = reference_latents(seed=5)
    expected = reference(PROMPTS, latents=latents, num_inference_steps=4, guidance_scale=8.0, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, sampler="lcm", steps=4, guidance=8.0, seed=0, latents=nchw_to_nhwc(latents),
                          mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    weaker = jdiff.generate(pipe, PROMPTS, sampler="lcm", steps=4, guidance=2.0, seed=0,
                            latents=nchw_to_nhwc(latents), mesh=one_device)
    assert np.abs(weaker - ours).max() > 2 * TOL  # the guidance embedding is used


def test_changing_prompts_seed_guidance_strength_steps_and_image_compiles_once(tiny, one_device):
    folder, reference, pipe = tiny
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    image, _ = init_image_and_mask()
    other = np.asarray(image, np.float32)[::-1] / 255
    jdiff.generate(pipe, PROMPTS, init_image=image, steps=4, guidance=7.5, seed=0, mesh=one_device)
    first = len(compiles)
    assert first >= 1
    calls = [
        dict(prompts=["circle", "a circle"]),
        dict(seed=123),
        dict(guidance=3.0),
        dict(init_image=other),
        dict(strength=0.5),
        dict(steps=9),
        dict(negative_prompts=["red", "blue"]),
    ]
    results = []
    for change in calls:
        kw = dict(prompts=PROMPTS, init_image=image, steps=4, guidance=7.5, seed=0, mesh=one_device) | change
        results.append(jdiff.generate(pipe, kw.pop("prompts"), **kw))
    assert len(compiles) == first, "a traced setting caused a recompilation"
    assert all(np.abs(r - results[0]).max() > 0 for r in results[1:])
    # A new image size is a new program: it compiles once, then is reused.
    jdiff.generate(pipe, PROMPTS, height=48, width=32, steps=2, mesh=one_device)
    after_resize = len(compiles)
    assert after_resize > first
    jdiff.generate(pipe, PROMPTS, height=48, width=32, steps=5, seed=3, guidance=2.0, mesh=one_device)
    assert len(compiles) == after_resize


def test_batch_sharded_over_eight_devices_equals_one_device(tiny, one_device):
    folder, reference, pipe = tiny
    assert len(jax.devices()) == 8
    prompts = ["a red circle", "circle", "red", "a circle", "red red", "c"]  # padded to 8 on 8 devices
    kw = dict(sampler="euler", steps=3, guidance=5.0, seed=7)
    sharded = jdiff.generate(pipe, prompts, **kw)
    single = jdiff.generate(pipe, prompts, mesh=one_device, **kw)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
    alone = jdiff.generate(pipe, prompts[3], **{**kw, "seed": 10}, mesh=one_device)  # image 3 has seed 7 + 3
    np.testing.assert_allclose(alone[0], single[3], rtol=0, atol=1e-5)


def test_bad_input_gets_a_clear_message(tiny, tmp_path, one_device):
    folder, reference, pipe = tiny
    with pytest.raises(ConfigError, match="valid samplers are: ddim, ddpm, euler, euler_a"):
        jdiff.generate(pipe, "a", sampler="plms")
    with pytest.raises(ConfigError, match="multiples of 8, got 36x32"):
        jdiff.generate(pipe, "a", height=36, width=32)
    image, _ = init_image_and_mask()
    with pytest.raises(ConfigError, match="mask is 16x16 but the image is 32x32"):
        jdiff.generate(pipe, "a", init_image=image, mask=np.ones((16, 16)))
    with pytest.raises(ConfigError, match="mask needs an init_image"):
        jdiff.generate(pipe, "a", mask=np.ones((32, 32)))
    with pytest.raises(ConfigError, match="no prompts"):
        jdiff.generate(pipe, [])
    with pytest.raises(CheckpointError, match="not a diffusion checkpoint: it lacks unet/"):
        jdiff.load_pipeline(folder / "vae")
    with pytest.warns(UserWarning, match="longer than the text encoder's 77 tokens"):
        images = jdiff.generate(pipe, "red " * 100, steps=1, mesh=one_device)
    assert images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("scheduler_class", ["PNDMScheduler", "UniPCMultistepScheduler", "LMSDiscreteScheduler"])
def test_default_sampler_and_steps_are_the_checkpoints_own(tiny, scheduler_class, tmp_path, one_device):
    """generate(pipe, prompts) with no sampler or steps runs what diffusers' pipe(prompts) runs: the
    scheduler class the checkpoint ships, with the pipeline's default step count (50)."""
    import dataclasses

    import diffusers
    from jdiff.schedules import read_scheduler_config

    folder, reference, pipe = tiny
    reference.scheduler = getattr(diffusers, scheduler_class).from_config(reference.scheduler.config)
    reference.scheduler.save_config(tmp_path)
    shipped = dataclasses.replace(pipe, scheduler=read_scheduler_config(tmp_path), _placed={})
    assert jdiff.checkpoint_sampling(shipped)[1] == 50
    latents = reference_latents(seed=4)
    expected = reference(PROMPTS, latents=latents, guidance_scale=7.5, output_type="np").images
    ours = jdiff.generate(shipped, PROMPTS, guidance=7.5, latents=nchw_to_nhwc(latents), mesh=one_device)
    assert 0.02 < expected.std()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_a_scheduler_jdiff_cannot_run_is_named(tiny, tmp_path):
    import dataclasses

    from jdiff.schedules import Scheduler

    _, _, pipe = tiny
    unknown = dataclasses.replace(pipe, scheduler=Scheduler(pipe.scheduler.config, "KDPM2DiscreteScheduler"),
                                  _placed={})
    with pytest.raises(ConfigError, match="'KDPM2DiscreteScheduler' is not one jdiff can run; pass sampler="):
        jdiff.generate(unknown, "a")
