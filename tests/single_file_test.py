"""Single-file SD checkpoints in the original (LDM) key layout, read by jdiff and by diffusers'
`from_single_file` from the same file: the same weights and the same images."""

import numpy as np
import pytest
import safetensors.numpy
import torch

import jdiff
from jdiff import convert, single_file
from jdiff.errors import CheckpointError
from jdiff.models.text import CLIPTextConfig
from jdiff.models.unet import UNetConfig
from jdiff.models.vae import VAEConfig
from parity import nchw_to_nhwc, same_params

PROMPTS = ["a red circle", "circle"]


def _invert(state: dict, prefixes, sub_names: dict) -> dict:
    """diffusers keys -> original keys, by the same prefix table read backwards (diffusers'
    from_single_file, which has its own conversion, is the independent check)."""
    out = {}
    for key, value in state.items():
        for old, new, kind in prefixes:
            if key.startswith(new + "."):
                rest = key[len(new) + 1:]
                for a, b in sub_names.get(kind, {}).items():
                    if rest == b or rest.startswith(b + "."):
                        rest = a + rest[len(b):]
                        break
                out[f"{old}.{rest}"] = value
                break
        else:
            raise AssertionError(f"no original name for {key}")
    return out


def clip_keys(text: dict, prefix: str) -> dict:
    # Original files name the CLIP weights text_model.*; transformers >= 5.6 saves them without it.
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in text.items()}


def open_clip_keys(text: dict, prefix: str, layers: int) -> dict:
    """transformers' CLIP keys as OpenCLIP stores them: q, k, v as one in_proj, the projection transposed."""
    t = "text_model."
    text = {(k if k.startswith((t, "text_projection")) else t + k): v for k, v in text.items()}
    width = text[t + "final_layer_norm.weight"].shape[0]
    projection = text["text_projection.weight"].T if "text_projection.weight" in text else np.eye(width, dtype=np.float32)
    state = {prefix + "token_embedding.weight": text[t + "embeddings.token_embedding.weight"],
             prefix + "positional_embedding": text[t + "embeddings.position_embedding.weight"],
             prefix + "ln_final.weight": text[t + "final_layer_norm.weight"],
             prefix + "ln_final.bias": text[t + "final_layer_norm.bias"],
             prefix + "text_projection": np.ascontiguousarray(projection)}
    for i in range(layers):
        old, new = f"{prefix}transformer.resblocks.{i}.", f"{t}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            state[f"{old}attn.in_proj_{kind}"] = np.concatenate([text[f"{new}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            state.update({f"{old}{a}.{kind}": text[f"{new}{b}.{kind}"] for a, b in single_file.OPEN_CLIP_NAMES.items()})
    return state


def write_single_file(folder, path, open_clip: bool = False):
    """The diffusers folder's weights as one file in the original layout: SD 1.x's OpenAI CLIP keys,
    SD 2.x's OpenCLIP keys (open_clip=True), or SDXL's two embedders (when the folder has
    text_encoder_2)."""
    read = lambda c: safetensors.numpy.load_file(  # noqa: E731
        str(next((folder / c).glob("*.safetensors"))))
    layers = lambda c: CLIPTextConfig.from_dict(convert.read_json(folder / c / "config.json")).num_hidden_layers  # noqa: E731
    unet_config = UNetConfig.from_dict(convert.read_json(folder / "unet" / "config.json"))
    vae_config = VAEConfig.from_dict(convert.read_json(folder / "vae" / "config.json"))
    unet = _invert(read("unet"), single_file.unet_prefixes(unet_config), {"resnet": single_file._RESNET})
    vae = _invert(read("vae"), single_file.vae_prefixes(vae_config),
                  {"resnet": single_file._VAE_RESNET, "attention": single_file._VAE_ATTENTION})
    vae = {k: (v[:, :, None, None] if ".attn_1." in k and k.endswith("weight") and v.ndim == 2 else v)
           for k, v in vae.items()}
    state = {**{single_file.UNET + k: v for k, v in unet.items()}, **{single_file.VAE + k: v for k, v in vae.items()}}
    if not (folder / "text_encoder").is_dir():  # the SDXL refiner: bigG alone
        state.update(open_clip_keys(read("text_encoder_2"), single_file.REFINER_OPEN_CLIP_G, layers("text_encoder_2")))
    elif (folder / "text_encoder_2").is_dir():
        state.update(clip_keys(read("text_encoder"), single_file.SDXL_CLIP_L))
        state.update(open_clip_keys(read("text_encoder_2"), single_file.SDXL_OPEN_CLIP_G, layers("text_encoder_2")))
    elif open_clip:
        state.update(open_clip_keys(read("text_encoder"), single_file.OPEN_CLIP, layers("text_encoder")))
    else:
        state.update(clip_keys(read("text_encoder"), "cond_stage_model.transformer."))
    safetensors.numpy.save_file(state, str(path))
    return state


@pytest.mark.parametrize("open_clip", [False, True], ids=["sd1_clip", "sd2_open_clip"])
def test_a_single_file_loads_the_same_weights_and_draws_what_diffusers_draws(tmp_path, tiny_sd_folder, open_clip,
                                                                             one_device):
    from diffusers import StableDiffusionPipeline

    path = tmp_path / "model.safetensors"
    write_single_file(tiny_sd_folder, path, open_clip=open_clip)
    pipe = jdiff.load_pipeline(path, config=tiny_sd_folder)
    folder_pipe = jdiff.load_pipeline(tiny_sd_folder)
    for name in ("unet", "vae", "text_encoder"):
        assert same_params(pipe.params[name], folder_pipe.params[name]), name
    assert pipe.source == str(path)

    reference = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_sd_folder), safety_checker=None,
                                                         local_files_only=True)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = reference(PROMPTS, latents=latents, num_inference_steps=3, guidance_scale=4.0, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, steps=3, guidance=4.0, latents=nchw_to_nhwc(latents), mesh=one_device)
    assert 0.02 < expected.std()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2 / 255)


def test_an_sdxl_single_file_loads_the_same_weights_and_draws_what_diffusers_draws(tmp_path, one_device):
    from diffusers import StableDiffusionXLPipeline

    from tiny_models import make_tiny_sdxl_pipeline

    # The two encoders differ in width, as CLIP ViT-L and bigG do: diffusers tells them apart by it.
    folder = tmp_path / "sdxl"
    make_tiny_sdxl_pipeline(folder, text_2_width=48)
    path = tmp_path / "sdxl.safetensors"
    write_single_file(folder, path)
    pipe = jdiff.load_pipeline(path, config=folder)
    folder_pipe = jdiff.load_pipeline(folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert same_params(pipe.params[name], folder_pipe.params[name]), name
    reference = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = reference(PROMPTS, latents=latents, num_inference_steps=3, guidance_scale=5.0, output_type="np").images
    ours = jdiff.generate(pipe, PROMPTS, steps=3, guidance=5.0, latents=nchw_to_nhwc(latents), mesh=one_device)
    assert 0.02 < expected.std()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2 / 255)


def test_an_sdxl_refiner_single_file_loads_what_diffusers_loads(tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from tiny_models import make_tiny_sdxl_pipeline

    folder = tmp_path / "refiner"
    make_tiny_sdxl_pipeline(folder, refiner=True, text_2_width=48)
    path = tmp_path / "refiner.safetensors"
    write_single_file(folder, path)
    pipe = jdiff.load_pipeline(path, config=folder)
    assert "text_encoder" not in pipe.params
    folder_pipe = jdiff.load_pipeline(folder)
    for name in ("unet", "vae", "text_encoder_2"):
        assert same_params(pipe.params[name], folder_pipe.params[name]), name
    # diffusers' own conversion of the same file gives the folder's tensors.
    reference = StableDiffusionXLImg2ImgPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    original = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder_2"):
        ours, theirs = getattr(original, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_single_file_errors_are_named(tmp_path, tiny_sd_folder, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # whatever this machine holds
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"is a PyTorch pickle.*safetensors.torch.save_file"):
        jdiff.load_pipeline(tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        jdiff.load_pipeline(tmp_path / "missing.safetensors")
    (tmp_path / "garbled.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        jdiff.load_pipeline(tmp_path / "garbled.safetensors")
    safetensors.numpy.save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a single-file Stable Diffusion checkpoint"):
        jdiff.load_pipeline(tmp_path / "other.safetensors")
    # Without config=, the model type's usual repo is looked for in the (here empty) cache.
    state = write_single_file(tiny_sd_folder, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"its configs and tokenizer come from stable-diffusion-v1-5/"
                                              r"stable-diffusion-v1-5, which is not in the local Hugging Face cache"):
        jdiff.load_pipeline(tmp_path / "model.safetensors")
    # A file with a block the config lacks names it.
    state[single_file.UNET + "input_blocks.9.0.in_layers.0.weight"] = np.zeros(4, np.float32)
    safetensors.numpy.save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 U-Net tensors of the single file match no block.*input_blocks.9"):
        jdiff.load_pipeline(tmp_path / "extra.safetensors", config=tiny_sd_folder)
