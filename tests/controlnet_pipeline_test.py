"""ControlNet in generate(): diffusers' StableDiffusionControlNetPipeline (one ControlNet and two) and
StableDiffusionXLControlNetPipeline against jdiff from the same weights and latents, scales and
guidance windows that never recompile, and bad input."""

import jax
import numpy as np
import pytest
import torch

import jdiff
from jdiff.errors import ConfigError
from parity import nchw_to_nhwc, randomize_torch

PROMPTS = ["a red circle", "circle"]
TOL = 2 / 255
SIZE = 32  # the tiny pipelines' images; their latents are 4x4


def make_controlnets(unet, folder, seeds):
    """Random ControlNets shaped after `unet` (diffusers' from_unet), each written to folder/cn<seed>."""
    from diffusers import ControlNetModel

    folders = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
        randomize_torch(model, scale=1.0, seed=seed)  # the zero convolutions too
        # strong enough that the control image itself, not only the biases, moves the residuals
        randomize_torch(model.controlnet_cond_embedding, scale=1.5, seed=seed)
        folders.append(folder / f"cn{seed}")
        model.save_pretrained(folders[-1])
    return folders


def control_images(count: int, seed: int) -> np.ndarray:
    """[count, H, W, 3] in [0, 1]: blocky pictures, like edge or segmentation maps."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(size=(count, SIZE // 8, SIZE // 8, 3)).astype(np.float32)
    return np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)


def as_torch(images: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def latents(batch=2, seed=0):
    return torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd(tiny_sd_folder, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    folders = make_controlnets(reference.unet, tmp_path_factory.mktemp("controlnets"), seeds=(1, 2))
    return reference, folders


def reference_pipeline(reference, folders):
    from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline

    nets = [ControlNetModel.from_pretrained(f) for f in folders]
    return StableDiffusionControlNetPipeline(
        vae=reference.vae, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer, unet=reference.unet,
        controlnet=nets[0] if len(nets) == 1 else MultiControlNetModel(nets), scheduler=reference.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


CASES = {  # name: (ControlNets used, generate()'s control settings, guidance)
    "plain": (1, dict(), 5.0),
    "scale_and_window": (1, dict(controlnet_conditioning_scale=1.8, control_guidance_start=0.25,
                                 control_guidance_end=0.75), 5.0),
    "guess_mode": (1, dict(guess_mode=True), 5.0),
    "unguided": (1, dict(controlnet_conditioning_scale=1.3), 1.0),
    "two_controlnets": (2, dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.5],
                                control_guidance_end=[0.5, 1.0]), 5.0),
}


@pytest.mark.parametrize("case", CASES)
def test_sd_controlnet_matches_diffusers(sd, case, tiny_sd_folder, one_device):
    reference, folders = sd
    count, settings, guidance = CASES[case]
    images = [control_images(2, seed=k) for k in range(count)]
    start = latents(seed=3)
    ref_images = [as_torch(i) for i in images]
    expected = reference_pipeline(reference, folders[:count])(
        PROMPTS, image=ref_images[0] if count == 1 else ref_images, latents=start, num_inference_steps=4,
        guidance_scale=guidance, output_type="np", **settings).images
    pipe = jdiff.load_controlnet(jdiff.load_pipeline(tiny_sd_folder), folders[:count])
    ours = jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=4, guidance=guidance, latents=nchw_to_nhwc(start),
                          control_image=images[0] if count == 1 else images, mesh=one_device, **settings)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    # The ControlNets matter: without them the images differ well beyond the tolerance.
    plain = jdiff.generate(jdiff.load_pipeline(tiny_sd_folder), PROMPTS, sampler="ddim", steps=4, guidance=guidance,
                           latents=nchw_to_nhwc(start), mesh=one_device)
    assert np.abs(plain - expected).max() > 3 * TOL


def test_scales_windows_and_guess_mode_never_recompile(sd, tiny_sd_folder, one_device):
    _, folders = sd
    pipe = jdiff.load_controlnet(jdiff.load_pipeline(tiny_sd_folder), folders)
    images = [control_images(2, seed=k) for k in range(2)]
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    run = lambda **kw: jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=4, guidance=5.0, control_image=images,  # noqa: E731
                                      mesh=one_device, **kw)
    first = run()
    count = len(compiles)
    second = run(controlnet_conditioning_scale=[0.3, 1.2], control_guidance_start=[0.1, 0.0],
                 control_guidance_end=[1.0, 0.6], guess_mode=True)
    assert len(compiles) == count, "a new scale, window or guess mode compiled again"
    assert np.abs(first - second).max() > 10 * TOL


def test_one_controlnet_takes_a_list_with_one_picture_per_prompt(sd, tiny_sd_folder, one_device):
    _, folders = sd
    pipe = jdiff.load_controlnet(jdiff.load_pipeline(tiny_sd_folder), folders[0])
    images = control_images(2, seed=7)
    run = lambda control: jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=2, control_image=control,  # noqa: E731
                                         mesh=one_device)
    np.testing.assert_array_equal(run([images[0], images[1]]), run(images))


def test_bad_control_input(sd, tiny_sd_folder, tmp_path):
    _, folders = sd
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    image = control_images(1, seed=0)[0]
    with pytest.raises(ConfigError, match="load_controlnet"):
        jdiff.generate(pipe, "a", steps=2, control_image=image)
    controlled = jdiff.load_controlnet(pipe, folders)
    with pytest.raises(ConfigError, match="pass control_image"):
        jdiff.generate(controlled, "a", steps=2)
    with pytest.raises(ConfigError, match="list of 2 images"):
        jdiff.generate(controlled, "a", steps=2, control_image=image)
    with pytest.raises(ConfigError, match="2 entries for 2|entries for 2 ControlNets"):
        jdiff.generate(controlled, "a", steps=2, control_image=[image, image], controlnet_conditioning_scale=[1.0])
    with pytest.raises(ConfigError, match="start < end"):
        jdiff.generate(controlled, "a", steps=2, control_image=[image, image], control_guidance_start=0.9,
                       control_guidance_end=0.2)
    with pytest.raises(ConfigError, match="64x64 is generated"):
        jdiff.generate(controlled, "a", steps=2, control_image=[image, image], height=64, width=64)
    with pytest.raises(ConfigError, match="save the pipeline loaded without them"):
        jdiff.save_pipeline(controlled, tmp_path / "out")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_folder, tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    folders = make_controlnets(reference.unet, tmp_path_factory.mktemp("sdxl_controlnets"), seeds=(5,))
    return reference, folders


@pytest.mark.parametrize("settings", [dict(), dict(controlnet_conditioning_scale=0.7, guess_mode=True)])
def test_sdxl_controlnet_matches_diffusers(sdxl, settings, tiny_sdxl_folder, one_device):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    reference, folders = sdxl
    c = reference.components
    controlled = StableDiffusionXLControlNetPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
        tokenizer_2=c["tokenizer_2"], unet=c["unet"], controlnet=ControlNetModel.from_pretrained(folders[0]),
        scheduler=c["scheduler"], force_zeros_for_empty_prompt=reference.config.force_zeros_for_empty_prompt)
    image = control_images(2, seed=4)
    start = latents(seed=6)
    expected = controlled(PROMPTS, image=as_torch(image), latents=start, num_inference_steps=4, guidance_scale=5.0,
                          output_type="np", **settings).images
    pipe = jdiff.load_controlnet(jdiff.load_pipeline(tiny_sdxl_folder), folders[0])
    ours = jdiff.generate(pipe, PROMPTS, steps=4, guidance=5.0, latents=nchw_to_nhwc(start), control_image=image,
                          mesh=one_device, **settings)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    plain = jdiff.generate(jdiff.load_pipeline(tiny_sdxl_folder), PROMPTS, steps=4, guidance=5.0,
                           latents=nchw_to_nhwc(start), mesh=one_device)
    assert np.abs(plain - expected).max() > 3 * TOL


def test_sample_py_with_two_controlnets(sd, tiny_sd_folder, tmp_path, capsys):
    import sample
    from jdiff import image_io

    _, folders = sd
    images = [control_images(1, seed=k)[0] for k in range(2)]
    for k, image in enumerate(images):
        image_io.save_png(tmp_path / f"control{k}.png", image, {})
    command = ["--model", str(tiny_sd_folder), "--prompt", "a red circle", "--steps", "3", "--sampler", "ddim",
               "--guidance", "5", "--batch-size", "1", "--out", str(tmp_path / "out"),
               "--controlnet", str(folders[0]), "--control-image", str(tmp_path / "control0.png"),
               "--controlnet", str(folders[1]), "--control-image", str(tmp_path / "control1.png"),
               "--controlnet-scale", "0.8", "--controlnet-scale", "0.4", "--control-guidance-end", "0.7"]
    assert sample.main(command) == 0
    written = image_io.load_image(tmp_path / "out" / "00000.png")
    pipe = jdiff.load_controlnet(jdiff.load_pipeline(tiny_sd_folder), folders)
    expected = jdiff.generate(pipe, "a red circle", sampler="ddim", steps=3, guidance=5.0, seed=0,
                              control_image=[image_io.load_image(tmp_path / f"control{k}.png") for k in range(2)],
                              controlnet_conditioning_scale=[0.8, 0.4], control_guidance_end=0.7)[0]
    np.testing.assert_array_equal(image_io.to_uint8(written), image_io.to_uint8(expected))
    parameters = image_io.read_png_parameters(tmp_path / "out" / "00000.png")
    assert parameters["controlnet"] == [str(f) for f in folders] and parameters["controlnet_scale"] == [0.8, 0.4]
    one_image = command[:command.index("--controlnet")] + ["--controlnet", str(folders[0]), "--controlnet",
                                                            str(folders[1]), "--control-image", str(tmp_path / "control0.png")]
    assert sample.main(one_image + ["--overwrite"]) == 2
    assert "one control image per ControlNet" in capsys.readouterr().err


def test_sd_controlnet_image_to_image_matches_diffusers(sd, tiny_sd_folder, monkeypatch, one_device):
    """diffusers' StableDiffusionControlNetImg2ImgPipeline: the guidance window counts the steps that
    run after `strength` skips the noisiest ones."""
    import importlib

    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    reference, folders = sd
    noise = latents(seed=10)
    # The reference's noise is ours, and it encodes the init image by the posterior mean, as jdiff does.
    module = importlib.import_module("diffusers.pipelines.controlnet.pipeline_controlnet_img2img")
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: noise.clone())
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    controlled = StableDiffusionControlNetImg2ImgPipeline(
        vae=reference.vae, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer, unet=reference.unet,
        controlnet=ControlNetModel.from_pretrained(folders[0]), scheduler=reference.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    init, control = control_images(2, seed=8), control_images(2, seed=9)
    settings = dict(controlnet_conditioning_scale=1.5, control_guidance_start=0.3, control_guidance_end=0.9)
    expected = controlled(PROMPTS, image=as_torch(init), control_image=as_torch(control), strength=0.75,
                          num_inference_steps=8, guidance_scale=5.0, output_type="np", **settings).images
    pipe = jdiff.load_controlnet(jdiff.load_pipeline(tiny_sd_folder), folders[0])
    ours = jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=8, guidance=5.0, init_image=init, strength=0.75,
                          latents=nchw_to_nhwc(noise), control_image=control, mesh=one_device, **settings)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    uncontrolled = jdiff.generate(jdiff.load_pipeline(tiny_sd_folder), PROMPTS, sampler="ddim", steps=8, guidance=5.0,
                                  init_image=init, strength=0.75, latents=nchw_to_nhwc(noise), mesh=one_device)
    assert np.abs(uncontrolled - expected).max() > 3 * TOL


def test_sd_controlnet_inpainting_matches_diffusers(sd, tiny_sd_folder, monkeypatch, one_device):
    """diffusers' StableDiffusionControlNetInpaintPipeline with an ordinary (4-channel) U-Net: the
    ControlNet steers every step, the known region is put back after each one."""
    from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline
    from pipeline_test import init_image_and_mask, patch_reference_noise

    reference, folders = sd
    noise = latents(seed=12)
    patch_reference_noise(monkeypatch, "diffusers.pipelines.controlnet.pipeline_controlnet_inpaint", noise)
    controlled = StableDiffusionControlNetInpaintPipeline(
        vae=reference.vae, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer, unet=reference.unet,
        controlnet=ControlNetModel.from_pretrained(folders[0]), scheduler=reference.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    image, mask = init_image_and_mask(SIZE)
    control = control_images(2, seed=13)
    settings = dict(controlnet_conditioning_scale=1.4, control_guidance_end=0.8)
    expected = controlled(PROMPTS, image=image, mask_image=mask, control_image=as_torch(control), strength=0.9,
                          num_inference_steps=6, guidance_scale=5.0, output_type="np", **settings).images
    pipe = jdiff.load_controlnet(jdiff.load_pipeline(tiny_sd_folder), folders[0])
    ours = jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=6, guidance=5.0, init_image=image, mask=mask,
                          strength=0.9, latents=nchw_to_nhwc(noise), control_image=control, mesh=one_device, **settings)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    uncontrolled = jdiff.generate(jdiff.load_pipeline(tiny_sd_folder), PROMPTS, sampler="ddim", steps=6, guidance=5.0,
                                  init_image=image, mask=mask, strength=0.9, latents=nchw_to_nhwc(noise),
                                  mesh=one_device)
    assert np.abs(uncontrolled - expected).max() > 3 * TOL
    # Outside the mask both keep the picture: the control acts only where the mask repaints.
    keep = np.asarray(mask) == 0
    assert np.abs(ours[:, keep] - uncontrolled[:, keep]).max() < np.abs(ours - uncontrolled).max()
