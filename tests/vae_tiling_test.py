"""Tiled VAE encode and decode against diffusers' `enable_tiling()` on the same random weights."""

import json
import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from PIL import Image

import jdiff
from jdiff.convert import load_vae
from jdiff.errors import ConfigError
from jdiff.models import vae_tiling
from parity import max_rel_error, nchw_to_nhwc, randomize_torch
from pipeline_test import PROMPTS, TOL, patch_reference_noise, tiny, with_scheduler  # noqa: F401 (tiny: fixture)

# Factor 2, tiles of 16 pixels (8 latents): small enough that a 40x36 image is 4x3 tiles.
CONFIG = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
              sample_size=16)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiled_vae")
    torch.manual_seed(0)
    reference = randomize_torch(TorchVAE(**CONFIG))
    reference.save_pretrained(folder)
    module, params = load_vae(folder)
    return reference, module, params


def test_decode_and_encode_equal_diffusers_tiled_output(vaes):
    reference, module, params = vaes
    gen = torch.Generator().manual_seed(0)
    # Sizes that are no multiple of the tile stride: edge tiles of 5, 7 and 1 latents.
    z = torch.randn(2, 4, 11, 13, generator=gen)
    x = torch.rand(2, 3, 40, 36, generator=gen) * 2 - 1
    with torch.no_grad():
        plain_decoded = reference.decode(z).sample
        reference.enable_tiling()
        decoded = reference.decode(z).sample
        posterior = reference.encode(x).latent_dist
        reference.disable_tiling()
    tile = vae_tiling.default_tile(module)
    assert tile == 16
    ours = jax.jit(lambda p, a: vae_tiling.decode(module, p, a, tile))(params, nchw_to_nhwc(z))
    assert ours.shape == (2, 22, 26, 3)
    assert max_rel_error(ours, nchw_to_nhwc(decoded)) < 1e-4
    # Tiling changes the result (GroupNorm statistics per tile): the comparison above is of tiles.
    assert max_rel_error(nchw_to_nhwc(plain_decoded), nchw_to_nhwc(decoded)) > 1e-2
    ours_posterior = jax.jit(lambda p, a: vae_tiling.encode(module, p, a, tile))(params, nchw_to_nhwc(x))
    assert ours_posterior.mean.shape == (2, 20, 18, 4)
    assert max_rel_error(ours_posterior.mean, nchw_to_nhwc(posterior.mean)) < 1e-4
    assert max_rel_error(ours_posterior.logvar, nchw_to_nhwc(posterior.logvar)) < 1e-4


def test_an_image_within_one_tile_is_not_tiled(vaes):
    _, module, params = vaes
    z = jax.random.normal(jax.random.key(0), (1, 8, 6, 4))
    plain = module.apply({"params": params}, z, method="decode")
    np.testing.assert_array_equal(vae_tiling.decode(module, params, z, 16), plain)
    np.testing.assert_array_equal(vae_tiling.decode(module, params, z, 0), plain)


def test_generate_with_vae_tiling_matches_diffusers_img2img_with_tiling(tiny, monkeypatch, one_device):
    """Both the init image's encode and the final decode are tiled (the tiny VAE's tile is 32 px,
    the image 64x48), as diffusers' pipeline does after `enable_vae_tiling()`."""
    from diffusers import StableDiffusionImg2ImgPipeline

    folder, reference, pipe = tiny
    noise = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(3))
    patch_reference_noise(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img", noise)
    yy, xx = np.mgrid[:48, :64] / 48
    image = Image.fromarray((np.stack([yy, xx / 1.4, 0.5 + 0.3 * np.sin(6 * xx)], -1) * 255).astype(np.uint8))
    img2img = StableDiffusionImg2ImgPipeline(**with_scheduler(reference, "ddim").components)
    run_reference = lambda: img2img(PROMPTS, image=image, strength=0.6, num_inference_steps=4,  # noqa: E731
                                    guidance_scale=4.0, output_type="np").images
    untiled = run_reference()
    img2img.vae.enable_tiling()
    try:
        expected = run_reference()
    finally:
        img2img.vae.disable_tiling()
    assert np.abs(untiled - expected).max() > 2 * TOL  # tiling shows in the pixels: the test can fail
    kw = dict(sampler="ddim", init_image=image, strength=0.6, steps=4, guidance=4.0, latents=nchw_to_nhwc(noise),
              mesh=one_device)
    ours = jdiff.generate(pipe, PROMPTS, vae_tiling=True, **kw)
    assert ours.shape == expected.shape == (2, 48, 64, 3)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(jdiff.generate(pipe, PROMPTS, vae_tiling=32, **kw), ours, atol=1e-6)


def test_sample_py_tiles_when_asked(tiny, tmp_path):
    import sample

    folder, _, pipe = tiny
    out = tmp_path / "out"
    assert sample.main(["--model", str(folder), "--prompt", PROMPTS[0], "--steps", "2", "--seed", "3",
                        "--height", "48", "--width", "64", "--vae-tiling", "--batch-size", "1", "--out", str(out)]) == 0
    with Image.open(out / "00000.png") as image:
        drawn = np.asarray(image, np.float32) / 255
        assert json.loads(image.text["jdiff"])["vae_tiling"] is True
    expected = jdiff.generate(pipe, PROMPTS[0], steps=2, seed=3, height=48, width=64, vae_tiling=True)
    np.testing.assert_allclose(drawn, expected[0], atol=1.5 / 255)
    assert sample.main(["--model", str(folder), "--prompt", "a", "--vae-tiling", "12"]) == 2


def test_bad_vae_tiling_is_named(tiny):
    _, _, pipe = tiny
    for bad in (12, 4, "yes", 1.5):
        with pytest.raises(ConfigError, match="vae_tiling must be True, False or a tile size"):
            jdiff.generate(pipe, "a red circle", steps=1, vae_tiling=bad)
