"""LoRA: diffusers/PEFT and kohya files against diffusers' load_lora_weights + set_adapters on the
same random weights and latents; per-image adapter mixes; scales that never recompile; fusing;
clear errors for files that do not fit."""

import json

import diffusers
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

import jdiff
from jdiff.errors import CheckpointError, ConfigError
from parity import nchw_to_nhwc
from pipeline_test import TOL
from tiny_models import write_random_lora

PROMPTS = ["a red circle", "circle"]
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # as kohya trains a text encoder
# Attention, transformer projections, feed-forward and LoCon convolutions (the stride-2 downsampler
# and the upsampler's too), with per-layer ranks and a per-layer alpha on the convolutions.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2", "downsamplers.0.conv",
                "upsamplers.0.conv")
PATTERNS = dict(rank_pattern={"to_q": 2, "conv2": 3}, alpha_pattern={"conv1": 3})


def latents(batch=2, seed=0, size=4):
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


def reference_images(cls, folder, loras: dict, scales, *, steps=3, seed=0, size=4, **kw):
    """diffusers' images with `loras` ({adapter name: path}) loaded and set to `scales`."""
    reference = cls.from_pretrained(folder)
    for name, path in loras.items():
        reference.load_lora_weights(str(path), adapter_name=name)
    reference.set_adapters(list(loras), scales)
    return reference(PROMPTS, latents=latents(seed=seed, size=size), num_inference_steps=steps, output_type="np",
                     **kw).images


@pytest.fixture(scope="module")
def sd(tiny_sd_folder, tmp_path_factory):
    """The tiny SD pipeline and two random LoRAs for it, in diffusers' (PEFT) format."""
    root = tmp_path_factory.mktemp("sd_loras")
    style = write_random_lora(tiny_sd_folder, root / "style", seed=1, unet_targets=UNET_TARGETS,
                              text_targets=TEXT_TARGETS, scale=0.2, **PATTERNS)
    subject = write_random_lora(tiny_sd_folder, root / "subject", seed=2, rank=2, alpha=1, scale=0.4)
    return tiny_sd_folder, jdiff.load_pipeline(tiny_sd_folder), style, subject


def test_peft_file_matches_diffusers_and_changes_the_images(sd, one_device):
    folder, pipe, style, _ = sd
    expected = reference_images(diffusers.StableDiffusionPipeline, folder, {"style": style}, [0.7])
    with_lora = jdiff.load_lora_weights(pipe, style, adapter_name="style")
    assert set(with_lora.adapters["style"]) == {"unet", "text_encoder"}
    assert with_lora.params is pipe.params  # the base weights are shared, not copied
    ours = jdiff.generate(with_lora, PROMPTS, steps=3, latents=nchw_to_nhwc(latents()),
                          lora_scales={"style": 0.7}, mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    plain = jdiff.generate(pipe, PROMPTS, steps=3, latents=nchw_to_nhwc(latents()), mesh=one_device)
    assert np.abs(plain - ours).max() > 20 * TOL  # the LoRA matters: the comparison means something
    off = jdiff.generate(with_lora, PROMPTS, steps=3, latents=nchw_to_nhwc(latents()), lora_scales={},
                         mesh=one_device)
    np.testing.assert_allclose(off, plain, atol=1e-5)  # every adapter off: the base model


def loaded(pipe, *named):
    """`pipe` with (path, name) adapters loaded in this order."""
    for path, name in named:
        pipe = jdiff.load_lora_weights(pipe, path, adapter_name=name)
    return pipe


def test_two_adapters_with_weights_match_diffusers(sd, one_device):
    folder, pipe, style, subject = sd
    expected = reference_images(diffusers.StableDiffusionPipeline, folder, {"subject": subject, "style": style},
                                [1.2, 0.5], seed=1)
    both = loaded(pipe, (subject, "subject"), (style, "style"))  # not in name order: scales follow names
    ours = jdiff.generate(both, PROMPTS, steps=3, latents=nchw_to_nhwc(latents(seed=1)),
                          lora_scales={"style": 0.5, "subject": 1.2}, mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_kohya_file_written_by_jdiff_matches_diffusers(sd, tmp_path, one_device):
    folder, pipe, style, _ = sd
    kohya = jdiff.save_lora_weights(jdiff.load_lora_weights(pipe, style), tmp_path / "style_kohya.safetensors",
                                    format="kohya")
    keys = safetensors.numpy.load_file(str(kohya))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in keys
    expected = reference_images(diffusers.StableDiffusionPipeline, folder, {"k": kohya}, [0.7])
    ours = jdiff.generate(jdiff.load_lora_weights(pipe, kohya, adapter_name="k"), PROMPTS, steps=3,
                          latents=nchw_to_nhwc(latents()), lora_scales={"k": 0.7}, mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_formats_round_trip_with_per_layer_alphas(sd, tmp_path, one_device):
    """Written as PEFT or kohya and read back, an adapter is the same one, alphas included. (diffusers
    0.42 cannot serve as the reference here: it drops a kohya file's per-layer alphas on attention
    projections, keying them `...processor.to_v_lora.down.weight`, which matches no module.)"""
    folder, pipe, _, _ = sd
    lora = write_random_lora(folder, tmp_path / "alphas", seed=3, text_targets=TEXT_TARGETS,
                             alpha_pattern={"to_v": 3, "to_k": 5})
    original = jdiff.load_lora_weights(pipe, lora, adapter_name="a")
    reference = jdiff.generate(original, PROMPTS, steps=3, latents=nchw_to_nhwc(latents()), mesh=one_device)
    for fmt in ("peft", "kohya"):
        path = jdiff.save_lora_weights(original, tmp_path / fmt, format=fmt)
        again = jdiff.load_lora_weights(pipe, path, adapter_name="a")
        alphas = {(c, p): float(layer["alpha"]) for c, layers in again.adapters["a"].items() for p, layer in layers.items()}
        assert sorted(set(alphas.values())) == [3.0, 5.0, 8.0], fmt
        ours = jdiff.generate(again, PROMPTS, steps=3, latents=nchw_to_nhwc(latents()), mesh=one_device)
        np.testing.assert_allclose(ours, reference, atol=1e-6, err_msg=fmt)
    # diffusers reads jdiff's PEFT file, per-layer alphas included.
    expected = reference_images(diffusers.StableDiffusionPipeline, folder, {"p": tmp_path / "peft"}, [1.0])
    np.testing.assert_allclose(reference, expected, rtol=0, atol=TOL)


def test_adapters_mixed_per_image_equal_each_image_alone(sd, one_device):
    folder, pipe, style, subject = sd
    both = loaded(pipe, (subject, "subject"), (style, "style"))
    mixes = [{"style": 1.0}, {"subject": 0.8, "style": 0.3}]
    noise = nchw_to_nhwc(latents())
    batch = jdiff.generate(both, PROMPTS, steps=3, latents=noise, lora_scales=mixes, guidance=7.5, mesh=one_device)
    for i in range(2):
        alone = jdiff.generate(both, PROMPTS[i], steps=3, latents=noise[i:i + 1], lora_scales=mixes[i],
                               guidance=7.5, mesh=one_device)
        np.testing.assert_allclose(batch[i], alone[0], atol=2e-5, err_msg=f"image {i}")
    assert np.abs(batch[0] - jdiff.generate(both, PROMPTS[0], steps=3, latents=noise[:1], lora_scales=mixes[1],
                                            mesh=one_device)[0]).max() > 10 * TOL
    only_style = jdiff.generate(loaded(pipe, (style, "style")), PROMPTS[0], steps=3, latents=noise[:1],
                                guidance=7.5, mesh=one_device)
    np.testing.assert_allclose(batch[0], only_style[0], atol=2e-5)  # each name's scale reaches its own adapter


def test_changing_scales_and_mixes_never_recompiles(sd, one_device):
    folder, pipe, style, subject = sd
    both = loaded(pipe, (style, "style"), (subject, "subject"))
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    jdiff.generate(both, PROMPTS, steps=2, lora_scales={"style": 1.0}, mesh=one_device)
    first = len(compiles)
    for scales in ({"style": 0.2, "subject": 1.0}, None, {}, [{"subject": 0.5}, {"style": 2.0}],
                   [{}, {"style": -1.0, "subject": 0.1}]):
        jdiff.generate(both, PROMPTS, steps=2, lora_scales=scales, seed=3, mesh=one_device)
    assert len(compiles) == first, "a LoRA scale caused a recompilation"


def test_fused_adapters_equal_unmerged_ones(sd, one_device):
    folder, pipe, style, subject = sd
    base_images = jdiff.generate(pipe, PROMPTS, steps=3, mesh=one_device)
    checksum = lambda p: [float(np.asarray(a, np.float64).sum()) for a in jax.tree.leaves(p.params)]  # noqa: E731
    before = checksum(pipe)
    both = loaded(pipe, (style, "style"), (subject, "subject"))
    scales = {"style": 0.6, "subject": 0.9}
    unmerged = jdiff.generate(both, PROMPTS, steps=3, lora_scales=scales, mesh=one_device)
    fused = jdiff.fuse_lora(both, scales)
    assert not fused.adapters
    np.testing.assert_allclose(jdiff.generate(fused, PROMPTS, steps=3, mesh=one_device), unmerged, atol=1e-4)
    half = jdiff.fuse_lora(both, {"style": 0.6})  # the other adapter stays loaded, unmerged
    assert list(half.adapters) == ["subject"]
    np.testing.assert_allclose(jdiff.generate(half, PROMPTS, steps=3, lora_scales={"subject": 0.9}, mesh=one_device),
                               unmerged, atol=1e-4)
    # Neither loading nor fusing touched the weights of the pipeline they started from.
    assert checksum(pipe) == before
    np.testing.assert_array_equal(jdiff.generate(pipe, PROMPTS, steps=3, mesh=one_device), base_images)


def test_older_spellings_and_rank_stabilised_scaling(sd, tmp_path):
    """diffusers' pre-PEFT keys (`.lora.down`, attention processors' `to_q_lora`), a kohya file with
    alphas on some layers only, and PEFT's use_rslora read as diffusers reads them."""
    folder, pipe, style, _ = sd
    tensors, metadata = jdiff.lora.formats.read(style)
    peft = jdiff.load_lora_weights(pipe, style).adapters["default_0"]

    def renamed(key):
        key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        for projection in ("to_q", "to_k", "to_v"):
            key = key.replace(f".{projection}.lora.", f".processor.{projection}_lora.")
        return key.replace(".to_out.0.lora.", ".processor.to_out_lora.")

    old = {renamed(k): v for k, v in tensors.items()}
    assert any("processor.to_q_lora.down.weight" in k for k in old)
    path = tmp_path / "old.safetensors"
    safetensors.numpy.save_file(old, str(path), metadata=metadata)
    again = jdiff.load_lora_weights(pipe, path).adapters["default_0"]
    assert jax.tree.structure(again) == jax.tree.structure(peft)
    jax.tree.map(np.testing.assert_array_equal, again, peft)

    rank_stabilised = json.loads(metadata["lora_adapter_metadata"])
    rank_stabilised["unet.use_rslora"] = True
    path = tmp_path / "rslora.safetensors"
    safetensors.numpy.save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(rank_stabilised)})
    scaled = jdiff.load_lora_weights(pipe, path).adapters["default_0"]["unet"]
    for layer_path, layer in scaled.items():  # alpha / sqrt(r) = (alpha * sqrt(r)) / r
        rank = layer["down"].shape[-1]
        np.testing.assert_allclose(float(layer["alpha"]), float(peft["unet"][layer_path]["alpha"]) * rank ** 0.5,
                                   rtol=1e-6)

    kohya = safetensors.numpy.load_file(str(jdiff.save_lora_weights(loaded(pipe, (style, "s")),
                                                                      tmp_path / "k.safetensors", format="kohya")))
    text_alphas = sorted(k for k in kohya if k.startswith("lora_te_") and k.endswith(".alpha"))
    partial = {k: v for k, v in kohya.items() if k not in text_alphas[2:]}  # alphas on two layers only
    partial.update({k: np.array(3.0, np.float32) for k in text_alphas[:2]})
    path = tmp_path / "partial.safetensors"
    safetensors.numpy.save_file(partial, str(path))
    text = jdiff.load_lora_weights(pipe, path).adapters["default_0"]["text_encoder"]
    assert len(text) == len(text_alphas) > 2
    assert {float(layer["alpha"]) for layer in text.values()} == {3.0}  # the others: the file's most common


def test_sdxl_kohya_file_with_original_unet_names_matches_diffusers(tiny_sdxl_folder, tmp_path, one_device):
    """kohya's SDXL files name U-Net layers as the original (SGM) U-Net does: input_blocks_4_1_..."""
    folder = tiny_sdxl_folder
    peft = write_random_lora(folder, tmp_path / "xl", seed=4, unet_targets=UNET_TARGETS + ("time_emb_proj",),
                             text_targets=TEXT_TARGETS, scale=0.2)
    pipe = jdiff.load_pipeline(folder)
    with_lora = jdiff.load_lora_weights(pipe, peft, adapter_name="xl")
    assert set(with_lora.adapters["xl"]) == {"unet", "text_encoder", "text_encoder_2"}
    kohya = jdiff.save_lora_weights(with_lora, tmp_path / "xl_kohya.safetensors", format="kohya")
    keys = set(safetensors.numpy.load_file(str(kohya)))
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q.lora_down.weight" in keys  # SGM names
    assert "lora_unet_output_blocks_0_0_in_layers_2.lora_down.weight" in keys  # an up block's conv1
    assert any(k.startswith("lora_te2_") for k in keys) and any(k.startswith("lora_te1_") for k in keys)
    kw = dict(guidance_scale=5.0)
    for path in (peft, kohya):
        expected = reference_images(diffusers.StableDiffusionXLPipeline, folder, {"xl": path}, [0.8], **kw)
        ours = jdiff.generate(jdiff.load_lora_weights(pipe, path, adapter_name="xl"), PROMPTS, steps=3,
                              latents=nchw_to_nhwc(latents()), lora_scales={"xl": 0.8}, mesh=one_device)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL, err_msg=str(path))


def test_files_that_do_not_fit_get_clear_errors(sd, tmp_path):
    folder, pipe, style, _ = sd
    with pytest.raises(CheckpointError, match="does not exist"):
        jdiff.load_lora_weights(pipe, tmp_path / "missing.safetensors")
    tensors = safetensors.numpy.load_file(str(style / "pytorch_lora_weights.safetensors"))

    def write(name, changed):
        path = tmp_path / f"{name}.safetensors"
        safetensors.numpy.save_file(changed, str(path))
        return path

    down = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    renamed = {k.replace("attentions.0.transformer_blocks.0.attn1", "attentions.7.transformer_blocks.0.attn1"): v
               for k, v in tensors.items()}
    with pytest.raises(CheckpointError, match=r"match no layer.*attentions\.7"):
        jdiff.load_lora_weights(pipe, write("renamed", renamed))
    wider = dict(tensors, **{down: np.zeros((2, 64), np.float32)})
    with pytest.raises(CheckpointError, match="do not fit the layer's weight"):
        jdiff.load_lora_weights(pipe, write("wider", wider))
    dora = dict(tensors, **{down.replace("lora_A.weight", "lora_magnitude_vector"): np.ones(32, np.float32)})
    with pytest.raises(CheckpointError, match="DoRA"):
        jdiff.load_lora_weights(pipe, write("dora", dora))
    with pytest.raises(CheckpointError, match="no LoRA format"):
        jdiff.load_lora_weights(pipe, write("odd", {"model.diffusion_model.weight": np.zeros(3, np.float32)}))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="corrupt"):
        jdiff.load_lora_weights(pipe, bad)
    with_lora = jdiff.load_lora_weights(pipe, style, adapter_name="style")
    with pytest.raises(ConfigError, match="already loaded"):
        jdiff.load_lora_weights(with_lora, style, adapter_name="style")
    with pytest.raises(ConfigError, match=r"not loaded; loaded adapters: \['style'\]"):
        jdiff.generate(with_lora, PROMPTS, steps=1, lora_scales={"styel": 1.0})
    with pytest.raises(ConfigError, match="2 entries for 3 prompts"):
        jdiff.generate(with_lora, PROMPTS + ["x"], steps=1, lora_scales=[{}, {}])
    with pytest.raises(ConfigError, match="no LoRA is loaded"):
        jdiff.generate(pipe, PROMPTS, steps=1, lora_scales={"style": 1.0})
    with pytest.raises(ConfigError, match="unmerged LoRA adapters \\(style\\)"):
        jdiff.save_pipeline(with_lora, tmp_path / "with_lora")
    assert not (tmp_path / "with_lora").exists()
    assert json.loads(safetensors.safe_open(str(jdiff.save_lora_weights(with_lora, tmp_path / "out")), "np")
                      .metadata()["lora_adapter_metadata"])["unet.r"] == 4


def test_sample_py_applies_loras_at_their_scales(sd, tmp_path):
    import sample
    from PIL import Image

    folder, pipe, style, subject = sd
    out = tmp_path / "out"
    assert sample.main(["--model", str(folder), "--prompt", PROMPTS[0], "--steps", "2", "--seed", "3",
                        "--lora", f"{style}:0.7", "--lora", str(subject), "--out", str(out)]) == 0
    with Image.open(out / "00000.png") as image:
        drawn = np.asarray(image, np.float32) / 255
        assert str(style) in str(json.loads(image.text["jdiff"])["lora"])
    both = jdiff.load_lora_weights(jdiff.load_lora_weights(pipe, style), subject)
    expected = jdiff.generate(both, PROMPTS[0], steps=2, seed=3, lora_scales={"default_0": 0.7, "default_1": 1.0})
    np.testing.assert_allclose(drawn, expected[0], atol=1.5 / 255)
    assert sample.main(["--model", str(folder), "--prompt", "a", "--lora", f"{style}:strong"]) == 2
    assert sample.main(["--model", str(folder), "--prompt", "a", "--lora", str(tmp_path / "none.safetensors")]) == 2
