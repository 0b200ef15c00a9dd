"""Depth-to-image (SD 2 depth): diffusers' StableDiffusionDepth2ImgPipeline given the depth map, against
jdiff from the same weights and noise; the depth channel's resizing; bad input."""

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

import jdiff
from jdiff import depth
from jdiff.errors import ConfigError
from parity import nchw_to_nhwc
from tiny_models import make_tiny_sd_pipeline

PROMPTS = ["a red circle", "circle"]
TOL = 2 / 255


@pytest.fixture(scope="module")
def tiny_depth(tmp_path_factory):
    """A StableDiffusionDepth2ImgPipeline folder with random weights (a 5-channel U-Net), without the
    DPT depth estimator: depth maps are given."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    base = make_tiny_sd_pipeline(tmp_path_factory.mktemp("base") / "sd", in_channels=5, seed=20)
    c = base.components
    with torch.no_grad():  # a depth channel as strong as the latents, so the map visibly steers the image
        c["unet"].conv_in.weight[:, 4] *= 6.0
    reference = StableDiffusionDepth2ImgPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                                 unet=c["unet"], scheduler=c["scheduler"], depth_estimator=None,
                                                 feature_extractor=None)
    folder = tmp_path_factory.mktemp("depth") / "sd_depth"
    reference.save_pretrained(folder)
    return folder, StableDiffusionDepth2ImgPipeline.from_pretrained(folder, depth_estimator=None, feature_extractor=None)


def picture_and_depth(seed: int):
    rng = np.random.default_rng(seed)
    picture = (np.repeat(np.repeat(rng.uniform(size=(2, 4, 4, 3)), 8, axis=1), 8, axis=2) * 255).astype(np.uint8)
    # a nearer bump in the middle of each picture, in DPT-like units
    yy, xx = np.mgrid[:32, :32]
    bump = 30.0 * np.exp(-((yy - 16) ** 2 + (xx - 12 - 6 * np.arange(2)[:, None, None]) ** 2) / 60.0)
    return picture, (bump + rng.uniform(0, 3, size=(2, 32, 32))).astype(np.float32)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_depth_to_image_matches_diffusers(tiny_depth, sampler, monkeypatch, one_device):
    import diffusers
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    folder, reference = tiny_depth
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    module = importlib.import_module("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_depth2img")
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: noise.clone())
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    cls = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}[sampler]
    reference.scheduler = getattr(diffusers, cls).from_config(reference.scheduler.config)
    picture, depth_map = picture_and_depth(seed=1)
    expected = reference(PROMPTS, image=[Image.fromarray(p) for p in picture], depth_map=torch.from_numpy(depth_map),
                         strength=0.7, num_inference_steps=5, guidance_scale=5.0, output_type="np").images
    pipe = jdiff.load_pipeline(folder)
    ours = jdiff.generate(pipe, PROMPTS, sampler=sampler, init_image=picture / 255.0, depth_map=depth_map,
                          strength=0.7, steps=5, guidance=5.0, latents=nchw_to_nhwc(noise), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    # The depth channel matters: another depth map gives another image.
    other = jdiff.generate(pipe, PROMPTS, sampler=sampler, init_image=picture / 255.0, depth_map=depth_map.max() - depth_map,
                           strength=0.7, steps=5, guidance=5.0, latents=nchw_to_nhwc(noise), mesh=one_device)
    assert np.abs(other - expected).max() > 3 * TOL


def test_depth_channel_is_resized_and_scaled_as_diffusers_does():
    rng = np.random.default_rng(0)
    maps = rng.uniform(1.0, 9.0, size=(2, 40, 24))
    ours = depth.depth_condition(maps, 2, 5, 3)
    t = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(5, 3), mode="bicubic",
                                        align_corners=False)
    low, high = torch.amin(t, dim=[1, 2, 3], keepdim=True), torch.amax(t, dim=[1, 2, 3], keepdim=True)
    expected = (2.0 * (t - low) / (high - low) - 1.0)[:, 0, :, :, None].numpy()
    assert ours.shape == (2, 5, 3, 1)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(depth.depth_condition(maps[0], 2, 5, 3), np.repeat(ours[:1], 2, axis=0))


def test_depth_pipeline_saves_as_diffusers_reads_it(tiny_depth, tmp_path):
    from diffusers import StableDiffusionDepth2ImgPipeline

    folder, _ = tiny_depth
    pipe = jdiff.load_pipeline(folder)
    assert pipe.pipeline_class == "StableDiffusionDepth2ImgPipeline" and depth.takes_depth(pipe)
    jdiff.save_pipeline(pipe, tmp_path / "saved")
    assert jdiff.load_pipeline(tmp_path / "saved").pipeline_class == "StableDiffusionDepth2ImgPipeline"
    reread = StableDiffusionDepth2ImgPipeline.from_pretrained(tmp_path / "saved", depth_estimator=None,
                                                              feature_extractor=None)
    assert reread.unet.config.in_channels == 5


def test_bad_depth_input(tiny_depth, tiny_sd_folder):
    folder, _ = tiny_depth
    pipe = jdiff.load_pipeline(folder)
    picture, depth_map = picture_and_depth(seed=2)
    with pytest.raises(ConfigError, match="pass depth_map"):
        jdiff.generate(pipe, PROMPTS, init_image=picture / 255.0, steps=2)
    with pytest.raises(ConfigError, match="pass init_image"):
        jdiff.generate(pipe, PROMPTS, depth_map=depth_map, steps=2)
    with pytest.raises(ConfigError, match="flat"):
        jdiff.generate(pipe, PROMPTS, init_image=picture / 255.0, depth_map=np.ones((32, 32)), steps=2)
    with pytest.raises(ConfigError, match="3 maps for 2 prompts"):
        jdiff.generate(pipe, PROMPTS, init_image=picture / 255.0, depth_map=np.ones((3, 32, 32)), steps=2)
    with pytest.raises(ConfigError, match="takes none"):
        jdiff.generate(jdiff.load_pipeline(tiny_sd_folder), PROMPTS, init_image=picture / 255.0,
                       depth_map=depth_map, steps=2)


def test_sample_py_reads_depth_maps_from_npy_and_16_bit_png(tiny_depth, tmp_path):
    import sample
    from jdiff import image_io

    folder, _ = tiny_depth
    picture, depth_map = picture_and_depth(seed=3)
    Image.fromarray(picture[0]).save(tmp_path / "init.png")
    np.save(tmp_path / "depth.npy", depth_map[0])
    levels = np.round(depth_map[0] / depth_map[0].max() * 65535).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "depth.png")  # 16-bit greyscale, as depth tools write them
    pipe = jdiff.load_pipeline(folder)
    for name, values in (("depth.npy", depth_map[0]), ("depth.png", levels.astype(np.float32))):
        out = tmp_path / name.replace(".", "_")
        assert sample.main(["--model", str(folder), "--prompt", "a red circle", "--init-image", str(tmp_path / "init.png"),
                            "--depth-map", str(tmp_path / name), "--strength", "0.7", "--steps", "4", "--sampler",
                            "ddim", "--guidance", "5", "--batch-size", "1", "--out", str(out)]) == 0
        expected = jdiff.generate(pipe, "a red circle", sampler="ddim", steps=4, guidance=5.0, strength=0.7,
                                  init_image=image_io.load_image(tmp_path / "init.png"), depth_map=values)[0]
        np.testing.assert_array_equal(image_io.to_uint8(image_io.load_image(out / "00000.png")),
                                      image_io.to_uint8(expected))
        assert image_io.read_png_parameters(out / "00000.png")["depth_map"] == str(tmp_path / name)
