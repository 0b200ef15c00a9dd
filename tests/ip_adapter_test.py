"""IP-Adapter: diffusers' load_ip_adapter + set_ip_adapter_scale against jdiff.load_ip_adapter +
generate(ip_adapter_image=...) on random weights, a scale that never recompiles, and bad input."""

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import jdiff
from jdiff import ip_adapter
from jdiff.errors import CheckpointError, ConfigError
from parity import nchw_to_nhwc, randomize_torch

PROMPTS = ["a red circle", "circle"]
TOL = 2 / 255
TOKENS, EMBED = 4, 16  # image tokens, image embedding width


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    return Image.fromarray(np.repeat(np.repeat(blocks, 9, axis=0), 9, axis=1))  # 45x63: resized and cropped


def plus_projection(width: int, gen, hidden: int = 64, queries: int = TOKENS, features: int = 32) -> dict:
    """Random IP-Adapter Plus resampler weights in the original key layout (as its files hold them)."""
    def rand(*shape, scale=0.3):
        return torch.randn(shape, generator=gen) * scale

    state = {"image_proj.latents": rand(1, queries, hidden, scale=1.0),
             "image_proj.proj_in.weight": rand(hidden, features), "image_proj.proj_in.bias": rand(hidden),
             "image_proj.proj_out.weight": rand(width, hidden), "image_proj.proj_out.bias": rand(width),
             "image_proj.norm_out.weight": 1 + rand(width), "image_proj.norm_out.bias": rand(width)}
    for i in range(4):
        b = f"image_proj.layers.{i}."
        state.update({b + "0.norm1.weight": 1 + rand(hidden), b + "0.norm1.bias": rand(hidden),
                      b + "0.norm2.weight": 1 + rand(hidden), b + "0.norm2.bias": rand(hidden),
                      b + "0.to_q.weight": rand(64, hidden), b + "0.to_kv.weight": rand(128, hidden),
                      b + "0.to_out.weight": rand(hidden, 64), b + "1.0.weight": 1 + rand(hidden),
                      b + "1.0.bias": rand(hidden), b + "1.1.weight": rand(4 * hidden, hidden),
                      b + "1.3.weight": rand(hidden, 4 * hidden)})
    return state


def full_face_projection(width: int, gen, features: int = 32) -> dict:
    """Random full-face IP-Adapter projection weights in the original key layout (proj.0, proj.2, proj.3)."""
    rand = lambda *shape, scale=0.3: torch.randn(shape, generator=gen) * scale  # noqa: E731
    return {"image_proj.proj.0.weight": rand(features, features), "image_proj.proj.0.bias": rand(features),
            "image_proj.proj.2.weight": rand(width, features), "image_proj.proj.2.bias": rand(width),
            "image_proj.proj.3.weight": 1 + rand(width), "image_proj.proj.3.bias": rand(width)}


def make_adapter(folder, reference_class, root, plus: bool = False, full_face: bool = False):
    """(image encoder folder, IP-Adapter file, diffusers pipeline with both loaded) for the model in
    `folder`: a random CLIP image encoder and random IP-Adapter (IP-Adapter Plus, full-face) weights."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=EMBED, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8))
    randomize_torch(encoder, scale=1.0, seed=1)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    encoder.save_pretrained(root / "image_encoder")
    processor.save_pretrained(root / "image_encoder")

    reference = reference_class.from_pretrained(folder)
    write_adapter(folder, root / "ip-adapter.safetensors", plus=plus, full_face=full_face)

    reference.image_encoder = CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder")
    reference.feature_extractor = CLIPImageProcessor.from_pretrained(root / "image_encoder")
    reference.register_modules(image_encoder=reference.image_encoder, feature_extractor=reference.feature_extractor)
    reference.load_ip_adapter(str(root), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    return root / "image_encoder", root / "ip-adapter.safetensors", reference


def write_adapter(folder, file, *, plus: bool = False, full_face: bool = False, seed: int = 2) -> None:
    """Random IP-Adapter weights (plain, Plus or full-face) for the U-Net in `folder`, as a file."""
    pipe = jdiff.load_pipeline(folder)
    width = pipe.unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(seed)
    state = plus_projection(width, gen) if plus else full_face_projection(width, gen) if full_face else {
        "image_proj.proj.weight": torch.randn(TOKENS * width, EMBED, generator=gen) * 0.5,
        "image_proj.proj.bias": torch.randn(TOKENS * width, generator=gen) * 0.1,
        "image_proj.norm.weight": 1 + 0.2 * torch.randn(width, generator=gen),
        "image_proj.norm.bias": 0.2 * torch.randn(width, generator=gen)}
    for n, layer in enumerate(ip_adapter.cross_attention_paths(pipe.params["unet"])):
        inner = pipe.params["unet"]
        for part in layer.split("/"):
            inner = inner[part]
        shape = tuple(inner["to_k"]["kernel"].shape[::-1])  # torch's [out, in]
        for name in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * n + 1}.{name}.weight"] = torch.randn(shape, generator=gen) * 0.4
    safetensors.torch.save_file(state, file)


@pytest.fixture(scope="module")
def adapter(tiny_sd_folder, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    return make_adapter(tiny_sd_folder, StableDiffusionPipeline, tmp_path_factory.mktemp("ip_adapter"))


@pytest.mark.parametrize("scale, guidance", [(1.0, 5.0), (0.6, 5.0), (0.8, 1.0)])
def test_ip_adapter_matches_diffusers(adapter, tiny_sd_folder, scale, guidance, one_device):
    encoder, weights, reference = adapter
    reference.set_ip_adapter_scale(scale)
    start = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    image = picture(0)
    expected = reference(PROMPTS, ip_adapter_image=image, latents=start, num_inference_steps=4,
                         guidance_scale=guidance, output_type="np").images
    pipe = jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sd_folder), weights, image_encoder=encoder)
    ours = jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=4, guidance=guidance, latents=nchw_to_nhwc(start),
                          ip_adapter_image=image, ip_adapter_scale=scale, mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    # The picture matters: another one gives other images.
    other = jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=4, guidance=guidance, latents=nchw_to_nhwc(start),
                           ip_adapter_image=picture(1), ip_adapter_scale=scale, mesh=one_device)
    assert np.abs(other - expected).max() > 3 * TOL


def test_scale_and_picture_never_recompile_and_mix_per_image(adapter, tiny_sd_folder, one_device):
    encoder, weights, _ = adapter
    pipe = jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sd_folder), weights, image_encoder=encoder)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    run = lambda **kw: jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=3, guidance=5.0, seed=4,  # noqa: E731
                                      mesh=one_device, **kw)
    both = run(ip_adapter_image=[picture(0), picture(1)], ip_adapter_scale=[1.0, 0.3])
    count = len(compiles)
    first = run(ip_adapter_image=picture(0), ip_adapter_scale=1.0)
    second = run(ip_adapter_image=picture(1), ip_adapter_scale=0.3)
    assert len(compiles) == count, "a new picture or scale compiled again"
    # A batch mixing pictures and scales equals each image made with its own.
    np.testing.assert_allclose(both[0], first[0], atol=1e-5)
    np.testing.assert_allclose(both[1], second[1], atol=1e-5)


def test_bad_ip_adapter_input(adapter, tiny_sd_folder, tmp_path):
    encoder, weights, _ = adapter
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    with pytest.raises(ConfigError, match="load_ip_adapter"):
        jdiff.generate(pipe, "a", steps=2, ip_adapter_image=picture(0))
    attached = jdiff.load_ip_adapter(pipe, weights, image_encoder=encoder)
    with pytest.raises(ConfigError, match="pass ip_adapter_image"):
        jdiff.generate(attached, "a", steps=2)
    with pytest.raises(ConfigError, match="3 pictures for 2 prompts"):
        jdiff.generate(attached, PROMPTS, steps=2, ip_adapter_image=[picture(0)] * 3)
    with pytest.raises(ConfigError, match="IP-Adapter attached"):
        jdiff.save_pipeline(attached, tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not exist"):
        jdiff.load_ip_adapter(pipe, tmp_path / "missing.safetensors", image_encoder=encoder)
    plus = {"image_proj.latents": torch.zeros(1, 4, 32), "image_proj.proj_in.weight": torch.zeros(32, 16)}
    safetensors.torch.save_file(plus, tmp_path / "plus.safetensors")
    with pytest.raises(CheckpointError, match="not an IP-Adapter Plus file"):
        jdiff.load_ip_adapter(pipe, tmp_path / "plus.safetensors", image_encoder=encoder)


def test_sdxl_ip_adapter_matches_diffusers(tiny_sdxl_folder, tmp_path, one_device):
    from diffusers import StableDiffusionXLPipeline

    encoder, weights, reference = make_adapter(tiny_sdxl_folder, StableDiffusionXLPipeline, tmp_path)
    reference.set_ip_adapter_scale(0.7)
    start = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    expected = reference(PROMPTS, ip_adapter_image=picture(2), latents=start, num_inference_steps=4,
                         guidance_scale=5.0, output_type="np").images
    pipe = jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sdxl_folder), weights, image_encoder=encoder)
    ours = jdiff.generate(pipe, PROMPTS, steps=4, guidance=5.0, latents=nchw_to_nhwc(start),
                          ip_adapter_image=picture(2), ip_adapter_scale=0.7, mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    plain = jdiff.generate(jdiff.load_pipeline(tiny_sdxl_folder), PROMPTS, steps=4, guidance=5.0,
                           latents=nchw_to_nhwc(start), mesh=one_device)
    assert np.abs(plain - expected).max() > 3 * TOL


def test_sample_py_with_an_image_prompt(adapter, tiny_sd_folder, tmp_path):
    import sample
    from jdiff import image_io

    encoder, weights, _ = adapter
    picture(0).save(tmp_path / "prompt.png")
    assert sample.main(["--model", str(tiny_sd_folder), "--prompt", "a red circle", "--steps", "3", "--sampler", "ddim",
                        "--guidance", "5", "--batch-size", "1", "--out", str(tmp_path / "out"), "--ip-adapter",
                        str(weights), "--image-encoder", str(encoder), "--ip-adapter-image",
                        str(tmp_path / "prompt.png"), "--ip-adapter-scale", "0.6"]) == 0
    pipe = jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sd_folder), weights, image_encoder=encoder)
    expected = jdiff.generate(pipe, "a red circle", sampler="ddim", steps=3, guidance=5.0, ip_adapter_scale=0.6,
                              ip_adapter_image=image_io.load_image(tmp_path / "prompt.png"))[0]
    np.testing.assert_array_equal(image_io.to_uint8(image_io.load_image(tmp_path / "out" / "00000.png")),
                                  image_io.to_uint8(expected))
    assert image_io.read_png_parameters(tmp_path / "out" / "00000.png")["ip_adapter_scale"] == 0.6


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_ip_adapter_plus_matches_diffusers(tiny_sd_folder, tmp_path, guidance, one_device):
    """IP-Adapter Plus: a resampler over the image encoder's penultimate hidden states."""
    from diffusers import StableDiffusionPipeline

    encoder, weights, reference = make_adapter(tiny_sd_folder, StableDiffusionPipeline, tmp_path, plus=True)
    reference.set_ip_adapter_scale(0.8)
    start = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    expected = reference(PROMPTS, ip_adapter_image=picture(3), latents=start, num_inference_steps=4,
                         guidance_scale=guidance, output_type="np").images
    pipe = jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sd_folder), weights, image_encoder=encoder)
    ours = jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=4, guidance=guidance, latents=nchw_to_nhwc(start),
                          ip_adapter_image=picture(3), ip_adapter_scale=0.8, mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    other = jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=4, guidance=guidance, latents=nchw_to_nhwc(start),
                           ip_adapter_image=picture(4), ip_adapter_scale=0.8, mesh=one_device)
    assert np.abs(other - expected).max() > 3 * TOL


def test_full_face_ip_adapter_matches_diffusers(tiny_sd_folder, tmp_path, one_device):
    """The full-face IP-Adapter: one token per hidden state of the image encoder (every patch and the
    class token), through a two-layer MLP; diffusers' IPAdapterFullImageProjection."""
    from diffusers import StableDiffusionPipeline

    encoder, weights, reference = make_adapter(tiny_sd_folder, StableDiffusionPipeline, tmp_path, full_face=True)
    reference.set_ip_adapter_scale(0.7)
    start = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    expected = reference(PROMPTS, ip_adapter_image=picture(5), latents=start, num_inference_steps=4,
                         guidance_scale=5.0, output_type="np").images
    pipe = jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sd_folder), weights, image_encoder=encoder)
    assert set(pipe.params["ip_adapter"][0]) == {"full", "layers"}
    pixels = ip_adapter.image_pixels(pipe, [picture(5)], 1)
    (tokens,), _ = ip_adapter.image_tokens(pipe.modules, pipe.params, pixels, np.float32)
    assert tokens.shape == (1, (32 // 8) ** 2 + 1, pipe.unet.config.cross_attention_dim)  # patches + class token
    ours = jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=4, guidance=5.0, latents=nchw_to_nhwc(start),
                          ip_adapter_image=picture(5), ip_adapter_scale=0.7, mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    other = jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=4, guidance=5.0, latents=nchw_to_nhwc(start),
                           ip_adapter_image=picture(6), ip_adapter_scale=0.7, mesh=one_device)
    assert np.abs(other - expected).max() > 3 * TOL
    partial = {"image_proj.proj.3.weight": torch.ones(32), "image_proj.proj.3.bias": torch.zeros(32)}
    safetensors.torch.save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="not a full-face IP-Adapter file: it lacks 'image_proj.proj.0.weight'"):
        jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sd_folder), tmp_path / "partial.safetensors",
                              image_encoder=encoder)


# --- several IP-Adapters, and masks -----------------------------------------------------------------

def left_and_right(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Two masks split off the latent grid (at 5/12 of the width), so every layer's scaled mask
    has values between 0 and 1 along the split."""
    left = np.zeros((height, width), np.float32)
    left[:, : width * 5 // 12] = 1.0
    return left, 1.0 - left


@pytest.fixture(scope="module")
def two_adapters(adapter, tiny_sd_folder):
    """The plain adapter and a Plus one beside it, sharing the image encoder; and diffusers with both."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    encoder, weights, _ = adapter
    plus = weights.parent / "ip-adapter-plus.safetensors"
    write_adapter(tiny_sd_folder, plus, plus=True, seed=7)
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd_folder)
    reference.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder),
                               feature_extractor=CLIPImageProcessor.from_pretrained(encoder))
    reference.load_ip_adapter(str(weights.parent), subfolder="", weight_name=[weights.name, plus.name],
                              image_encoder_folder=None)
    return encoder, [weights, plus], reference


@pytest.mark.parametrize("masked", [False, True])
def test_two_ip_adapters_with_masks_match_diffusers(two_adapters, tiny_sd_folder, masked, one_device):
    """diffusers' load_ip_adapter with two files, set_ip_adapter_scale with two scales and, masked,
    IPAdapterMaskProcessor's masks through cross_attention_kwargs: one adapter steers the left half,
    the other the right."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    encoder, files, reference = two_adapters
    reference.set_ip_adapter_scale([0.9, 0.6])
    height, width = 32, 48  # 4x6 latents: the masks' grids are not square
    masks = left_and_right(height, width)
    start = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(9))
    extra = {"cross_attention_kwargs": {"ip_adapter_masks": IPAdapterMaskProcessor().preprocess(
        [Image.fromarray((m * 255).astype(np.uint8)) for m in masks], height=height, width=width)}} if masked else {}
    expected = reference(PROMPTS, ip_adapter_image=[picture(0), picture(1)], latents=start, num_inference_steps=4,
                         guidance_scale=5.0, height=height, width=width, output_type="np", **extra).images
    pipe = jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sd_folder), files, image_encoder=encoder)
    assert ip_adapter.count(pipe) == 2
    ours = jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=4, guidance=5.0, latents=nchw_to_nhwc(start),
                          ip_adapter_image=[picture(0), picture(1)], ip_adapter_scale=[0.9, 0.6],
                          ip_adapter_mask=list(masks) if masked else None, height=height, width=width,
                          mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    # Attached one after the other, they are the same pair.
    one_by_one = jdiff.load_ip_adapter(jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sd_folder), files[0],
                                                             image_encoder=encoder), files[1])
    again = jdiff.generate(one_by_one, PROMPTS, sampler="ddim", steps=4, guidance=5.0, latents=nchw_to_nhwc(start),
                           ip_adapter_image=[picture(0), picture(1)], ip_adapter_scale=[0.9, 0.6],
                           ip_adapter_mask=list(masks) if masked else None, height=height, width=width,
                           mesh=one_device)
    np.testing.assert_allclose(again, ours, atol=1e-6)
    if masked:  # the masks change the images, beyond the tolerance
        everywhere = jdiff.generate(pipe, PROMPTS, sampler="ddim", steps=4, guidance=5.0, latents=nchw_to_nhwc(start),
                                    ip_adapter_image=[picture(0), picture(1)], ip_adapter_scale=[0.9, 0.6],
                                    height=height, width=width, mesh=one_device)
        assert np.abs(everywhere - ours).max() > 3 * TOL


def test_a_mask_confines_its_adapter_and_masks_never_recompile(two_adapters, tiny_sd_folder, one_device):
    encoder, files, _ = two_adapters
    pipe = jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sd_folder), files, image_encoder=encoder)
    first_only = jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sd_folder), files[0], image_encoder=encoder)
    run = lambda p, **kw: jdiff.generate(p, PROMPTS, sampler="ddim", steps=3, guidance=5.0, seed=2,  # noqa: E731
                                         mesh=one_device, **kw)
    from jdiff import pipeline

    nowhere = np.zeros((32, 32), np.float32)
    silenced = run(pipe, ip_adapter_image=[picture(0), picture(1)], ip_adapter_scale=[0.8, 1.0],
                   ip_adapter_mask=[None, nowhere])
    # A second adapter masked out everywhere adds nothing; a single adapter masked out is no adapter.
    np.testing.assert_allclose(silenced, run(first_only, ip_adapter_image=picture(0), ip_adapter_scale=0.8),
                               atol=1e-5)
    np.testing.assert_allclose(run(first_only, ip_adapter_image=picture(0), ip_adapter_mask=nowhere),
                               run(jdiff.load_pipeline(tiny_sd_folder)), atol=1e-5)
    # One scale for every adapter, and 1.0 by default, as diffusers' set_ip_adapter_scale.
    np.testing.assert_allclose(run(pipe, ip_adapter_image=[picture(0), picture(1)]),
                               run(pipe, ip_adapter_image=[picture(0), picture(1)], ip_adapter_scale=[1.0, 1.0]),
                               atol=1e-6)
    count = pipeline._generate._cache_size()  # programs compiled in this process (a persistent-cache hit too)
    left, right = left_and_right(32, 32)
    halves = run(pipe, ip_adapter_image=[picture(0), picture(1)], ip_adapter_scale=[0.8, 1.0],
                 ip_adapter_mask=[[left, right], None])  # a mask per prompt
    both_left = run(pipe, ip_adapter_image=[picture(0), picture(1)], ip_adapter_scale=[0.8, 1.0],
                    ip_adapter_mask=[left, None])
    assert pipeline._generate._cache_size() == count, "other masks compiled again"
    assert np.abs(halves - silenced).max() > 3 * TOL
    # Each prompt's mask acts on its own image only.
    np.testing.assert_allclose(halves[0], both_left[0], atol=1e-6)
    assert np.abs(halves[1] - both_left[1]).max() > 3 * TOL


def test_mask_downsampling_is_diffusers():
    """Each layer's mask, against IPAdapterMaskProcessor.downsample: square and wide masks, grids
    that fit the layer and ones that must be padded or cut."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    rng = np.random.default_rng(0)
    cases = ((32, 32, 16), (32, 48, 24), (64, 40, 40), (32, 32, 24), (48, 32, 10), (8, 12, 24), (16, 16, 64))
    for height, width, queries in cases:  # the last two scale up: edge taps are clamped
        mask = (rng.random((2, height, width)) > 0.5).astype(np.float32)
        expected = IPAdapterMaskProcessor.downsample(torch.from_numpy(mask[:1]), 1, queries, 3)[..., :1].numpy()
        ours = np.asarray(ip_adapter.mask_for_layer(mask, queries))
        np.testing.assert_allclose(ours[:1], expected, atol=1e-5)
        assert ours.shape == (2, queries, 1)


def test_bad_input_with_several_ip_adapters(two_adapters, tiny_sd_folder, tmp_path):
    encoder, files, _ = two_adapters
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    with pytest.raises(ConfigError, match="needs image_encoder"):
        jdiff.load_ip_adapter(pipe, files[0])
    both = jdiff.load_ip_adapter(pipe, files, image_encoder=encoder)
    with pytest.raises(ConfigError, match="all share one"):
        jdiff.load_ip_adapter(both, files[0], image_encoder=tmp_path)
    with pytest.raises(ConfigError, match="2 IP-Adapters are attached: pass ip_adapter_image as a list"):
        jdiff.generate(both, PROMPTS, steps=2, ip_adapter_image=picture(0))
    with pytest.raises(ConfigError, match="pass ip_adapter_scale as a list"):
        jdiff.generate(both, PROMPTS, steps=2, ip_adapter_image=[picture(0)] * 2, ip_adapter_scale=[0.5] * 3)
    with pytest.raises(ConfigError, match="one \\[height, width\\] mask"):
        jdiff.generate(both, PROMPTS, steps=2, ip_adapter_image=[picture(0)] * 2,
                       ip_adapter_mask=[np.ones((1, 32, 32)), None])
    with pytest.raises(ConfigError, match="ip_adapter_mask has 3 masks for 2 prompts"):
        jdiff.generate(both, PROMPTS, steps=2, ip_adapter_image=[picture(0)] * 2,
                       ip_adapter_mask=[[np.ones((32, 32))] * 3, None])
    with pytest.raises(ConfigError, match="ip_adapter_mask needs an IP-Adapter"):
        jdiff.generate(pipe, PROMPTS, steps=2, ip_adapter_mask=np.ones((32, 32)))


def test_sample_py_with_two_image_prompts_and_a_mask(two_adapters, tiny_sd_folder, tmp_path):
    import sample
    from jdiff import image_io

    encoder, files, _ = two_adapters
    picture(0).save(tmp_path / "style.png")
    picture(1).save(tmp_path / "face.png")
    _, right = left_and_right(32, 32)
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "everywhere.png")
    Image.fromarray((right * 255).astype(np.uint8)).save(tmp_path / "right.png")
    adapters = []
    for file, image, mask in zip(files, ("style.png", "face.png"), ("everywhere.png", "right.png")):
        adapters += ["--ip-adapter", str(file), "--ip-adapter-image", str(tmp_path / image),
                     "--ip-adapter-mask", str(tmp_path / mask)]
    assert sample.main(["--model", str(tiny_sd_folder), "--prompt", "a red circle", "--steps", "3", "--sampler", "ddim",
                        "--guidance", "5", "--batch-size", "1", "--out", str(tmp_path / "out"), "--image-encoder",
                        str(encoder), *adapters, "--ip-adapter-scale", "0.6", "--ip-adapter-scale", "0.9"]) == 0
    pipe = jdiff.load_ip_adapter(jdiff.load_pipeline(tiny_sd_folder), files, image_encoder=encoder)
    expected = jdiff.generate(pipe, "a red circle", sampler="ddim", steps=3, guidance=5.0, ip_adapter_scale=[0.6, 0.9],
                              ip_adapter_image=[image_io.load_image(tmp_path / n) for n in ("style.png", "face.png")],
                              ip_adapter_mask=[image_io.load_image(tmp_path / n, mode="L")
                                               for n in ("everywhere.png", "right.png")])[0]
    np.testing.assert_array_equal(image_io.to_uint8(image_io.load_image(tmp_path / "out" / "00000.png")),
                                  image_io.to_uint8(expected))
    recorded = image_io.read_png_parameters(tmp_path / "out" / "00000.png")
    assert recorded["ip_adapter_scale"] == [0.6, 0.9] and recorded["ip_adapter_mask"][1].endswith("right.png")
    assert sample.main(["--model", str(tiny_sd_folder), "--prompt", "a", "--out", str(tmp_path / "bad"),
                        "--image-encoder", str(encoder), "--ip-adapter", str(files[0]), "--ip-adapter", str(files[1]),
                        "--ip-adapter-image", str(tmp_path / "style.png")]) == 2


def test_masks_are_prepared_as_diffusers_prepares_them():
    """Binarised at 0.5; an array of another size scaled by nearest neighbours, a PIL image by Lanczos
    in its own mode; uint8 masks in 0..255 (a 0/1 uint8 mask is refused, not read as all black)."""
    half = np.zeros((4, 6), np.float32)
    half[:, :3] = 0.7
    np.testing.assert_array_equal(ip_adapter._binary_mask(half, 8, 12), np.repeat(np.repeat(half > 0.5, 2, 0), 2, 1))
    np.testing.assert_array_equal(ip_adapter._binary_mask((half * 255).astype(np.uint8), 4, 6), half > 0.5)
    picture_mask = Image.fromarray((half > 0.5).astype(np.uint8) * 255).convert("1")
    assert ip_adapter._binary_mask(picture_mask, 8, 12)[:, :5].all() and not ip_adapter._binary_mask(
        picture_mask, 8, 12)[:, 7:].any()
    with pytest.raises(ConfigError, match="holds only 0 and 1"):
        ip_adapter._binary_mask((half > 0.5).astype(np.uint8), 4, 6)
