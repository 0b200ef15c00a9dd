"""Single-file Stable Diffusion 1.x/2.x and SDXL checkpoints: the original (CompVis/Stability "LDM")
key layout that A1111 and most model sites distribute, one .safetensors holding the U-Net
(`model.diffusion_model.*`), the VAE (`first_stage_model.*`) and the text encoders
(`cond_stage_model.*`: OpenAI CLIP for 1.x, OpenCLIP for 2.x; `conditioner.embedders.N.*` for SDXL's
CLIP ViT-L and OpenCLIP bigG, or the refiner's bigG alone).

The weights come from the file; configs, tokenizer and scheduler come from a diffusers folder of the
same model type (`config=`, a folder or a Hugging Face repo id in the local cache), as diffusers'
`from_single_file(..., config=)` does. Without `config=`, the model type is read from the tensors
and its usual repo is looked up in the local cache.

The renaming is built from the U-Net's and VAE's configs (block counts, which blocks attend), as a
table of (original prefix, diffusers prefix) pairs, so it holds for any SD-shaped size.
"""

import dataclasses

import numpy as np
import safetensors.numpy

from jdiff import hub, paths
from jdiff.errors import CheckpointError
from jdiff.paths import Path

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
OPEN_CLIP = TEXT + "model."  # SD 2.x
SDXL_CLIP_L = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L (text_encoder) ...
SDXL_OPEN_CLIP_G = "conditioner.embedders.1.model."  # ... and OpenCLIP bigG (text_encoder_2)
REFINER_OPEN_CLIP_G = "conditioner.embedders.0.model."  # the refiner: OpenCLIP bigG only
PICKLES = (".ckpt", ".pt", ".pth", ".bin")

# The repo each model type's configs and tokenizer come from when `config=` is not given.
DEFAULT_CONFIGS = {
    ("sd1", 4): "stable-diffusion-v1-5/stable-diffusion-v1-5",
    ("sd1", 9): "stable-diffusion-v1-5/stable-diffusion-inpainting",
    ("sd2", 4): "stabilityai/stable-diffusion-2-1",
    ("sd2", 9): "stabilityai/stable-diffusion-2-inpainting",
    ("sdxl", 4): "stabilityai/stable-diffusion-xl-base-1.0",
    ("sdxl", 9): "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    ("sdxl_refiner", 4): "stabilityai/stable-diffusion-xl-refiner-1.0",
}

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# An OpenCLIP layer's parts other than its fused q, k, v, by transformers' CLIP names.
OPEN_CLIP_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def read(path: Path) -> dict[str, np.ndarray]:
    if path.suffix in PICKLES:
        raise CheckpointError(
            f"{str(path)!r} is a PyTorch pickle; jdiff reads only .safetensors (a pickle can run code when "
            "loaded). Convert it once where PyTorch is installed: python -c \"import torch, safetensors.torch; "
            f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); "
            "sd = sd.get('state_dict', sd); "
            f"safetensors.torch.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.stem}.safetensors')\"")
    try:
        with paths.local_copy(path) as local:
            return safetensors.numpy.load_file(str(local))
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {e}") from None


def model_type(state: dict) -> tuple[str, int]:
    """("sd1" | "sd2" | "sdxl" | "sdxl_refiner", U-Net input channels) read from the tensors."""
    conv_in = state.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or not any(k.startswith(VAE) for k in state):
        raise CheckpointError("not a single-file Stable Diffusion checkpoint: it lacks the U-Net "
                              f"({UNET}*) or the VAE ({VAE}*). SD3 and Flux single files are not read yet; "
                              "use their diffusers folders.")
    kinds = [("sdxl", SDXL_OPEN_CLIP_G), ("sdxl_refiner", REFINER_OPEN_CLIP_G), ("sd2", OPEN_CLIP)]
    kind = next((k for k, prefix in kinds if prefix + "token_embedding.weight" in state), "sd1")
    return kind, int(conv_in.shape[1])


def _rename(state: dict, prefix_pairs, sub_names: dict | None = None) -> dict:
    """Keys under each original prefix moved under its diffusers prefix; `sub_names` renames the part
    right after the prefix (a ResNet's in_layers.0 -> norm1)."""
    out = {}
    for old, new in prefix_pairs:
        for key in [k for k in state if k.startswith(old + ".")]:
            rest = key[len(old) + 1:]
            for a, b in (sub_names or {}).items():
                if rest == a or rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            out[f"{new}.{rest}"] = state.pop(key)
    return out


def unet_prefixes(config) -> list[tuple[str, str, str]]:
    """(original prefix, diffusers prefix, kind) for every block of an SD-shaped U-Net; kind is
    "resnet", "attention" or "plain" (renamed as a whole)."""
    levels, per = len(config.block_out_channels), config.layers_per_block
    if not isinstance(per, int):
        raise CheckpointError("single-file U-Nets with a layer count per block are not read; use a diffusers folder.")
    pairs = [("time_embed.0", "time_embedding.linear_1", "plain"), ("time_embed.2", "time_embedding.linear_2", "plain"),
             ("label_emb.0.0", "add_embedding.linear_1", "plain"), ("label_emb.0.2", "add_embedding.linear_2", "plain"),
             ("input_blocks.0.0", "conv_in", "plain"), ("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain"),
             ("middle_block.0", "mid_block.resnets.0", "resnet"), ("middle_block.1", "mid_block.attentions.0", "attention"),
             ("middle_block.2", "mid_block.resnets.1", "resnet")]
    for level, kind in enumerate(config.down_block_types):
        for j in range(per):
            i = 1 + level * (per + 1) + j
            pairs.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if kind.startswith("CrossAttn"):
                pairs.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", "attention"))
        if level < levels - 1:
            pairs.append((f"input_blocks.{1 + level * (per + 1) + per}.0.op", f"down_blocks.{level}.downsamplers.0.conv",
                          "plain"))
    for level, kind in enumerate(config.up_block_types):
        attends = kind.startswith("CrossAttn")
        for j in range(per + 1):
            i = level * (per + 1) + j
            pairs.append((f"output_blocks.{i}.0", f"up_blocks.{level}.resnets.{j}", "resnet"))
            if attends:
                pairs.append((f"output_blocks.{i}.1", f"up_blocks.{level}.attentions.{j}", "attention"))
        if level < levels - 1:
            last = level * (per + 1) + per
            pairs.append((f"output_blocks.{last}.{2 if attends else 1}.conv", f"up_blocks.{level}.upsamplers.0.conv",
                          "plain"))
    return pairs


def vae_prefixes(config) -> list[tuple[str, str, str]]:
    levels = len(config.block_out_channels)
    pairs = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in", "plain"), (f"{part}.conv_out", f"{part}.conv_out", "plain"),
                  (f"{part}.norm_out", f"{part}.conv_norm_out", "plain"),
                  (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "resnet"),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "resnet"),
                  (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "attention")]
    for level in range(levels):
        for j in range(config.layers_per_block):
            pairs.append((f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", "resnet"))
        if level < levels - 1:
            pairs.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv",
                          "plain"))
        up = levels - 1 - level  # the original numbers decoder levels from the bottom
        for j in range(config.layers_per_block + 1):
            pairs.append((f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", "resnet"))
        if level > 0:
            pairs.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", "plain"))
    pairs += [("quant_conv", "quant_conv", "plain"), ("post_quant_conv", "post_quant_conv", "plain")]
    return pairs


def _by_kind(state: dict, prefixes, sub_names: dict) -> dict:
    out = {}
    for kind in ("plain", "resnet", "attention"):
        out.update(_rename(state, [(o, n) for o, n, k in prefixes if k == kind], sub_names.get(kind)))
    return out


def unet_state(state: dict, config) -> dict:
    part = {k[len(UNET):]: v for k, v in state.items() if k.startswith(UNET)}
    return _leftovers(_by_kind(part, unet_prefixes(config), {"resnet": _RESNET}), part, "U-Net")


def vae_state(state: dict, config) -> dict:
    part = {k[len(VAE):]: v for k, v in state.items() if k.startswith(VAE)}
    out = _by_kind(part, vae_prefixes(config), {"resnet": _VAE_RESNET, "attention": _VAE_ATTENTION})
    # The original's mid-block attention projections are 1x1 convolutions; diffusers' are linear.
    for key, value in out.items():
        if ".attentions.0.to_" in key and key.endswith(".weight") and value.ndim == 4:
            out[key] = value[:, :, 0, 0]
    return _leftovers(out, part, "VAE")


def text_states(state: dict, kind: str, configs: dict) -> dict:
    """The text encoders' parts as transformers' keys, by diffusers component name; `configs` holds
    each encoder's CLIPTextConfig."""
    if kind == "sdxl":
        return {"text_encoder": _clip_state(state, SDXL_CLIP_L),
                "text_encoder_2": open_clip_state(state, SDXL_OPEN_CLIP_G, configs["text_encoder_2"])}
    if kind == "sdxl_refiner":
        return {"text_encoder_2": open_clip_state(state, REFINER_OPEN_CLIP_G, configs["text_encoder_2"])}
    if kind == "sd2":
        return {"text_encoder": open_clip_state(state, OPEN_CLIP, configs["text_encoder"])}
    return {"text_encoder": _clip_state(state, TEXT + "transformer.")}


def _clip_state(state: dict, prefix: str) -> dict:
    """OpenAI CLIP, stored with transformers' own names under `prefix` (older files omit `text_model.`)."""
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in part.items()}


def open_clip_state(state: dict, prefix: str, config) -> dict:
    """OpenCLIP (SD 2.x, SDXL's bigG) stores each layer's q, k, v as one in_proj matrix and may hold
    more layers than the pipeline uses (SD 2.x's encoder stops one layer short: the unused layers are
    dropped, as diffusers does). With a projection (SDXL), `text_projection` is stored transposed."""
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        return _open_clip_state(part, config)
    except KeyError as e:
        raise CheckpointError(f"the single file's OpenCLIP text encoder lacks {prefix}{e.args[0]} that a "
                              f"{config.num_hidden_layers}-layer encoder needs; pass config= a diffusers folder "
                              "of the same model.") from None


def _open_clip_state(part: dict, config) -> dict:
    out = {"text_model.embeddings.token_embedding.weight": part.pop("token_embedding.weight"),
           "text_model.embeddings.position_embedding.weight": part.pop("positional_embedding"),
           "text_model.final_layer_norm.weight": part.pop("ln_final.weight"),
           "text_model.final_layer_norm.bias": part.pop("ln_final.bias")}
    if config.with_projection:
        out["text_projection.weight"] = np.ascontiguousarray(part.pop("text_projection").T)
    for i in range(config.num_hidden_layers):
        old, new = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = np.split(part.pop(f"{old}attn.in_proj_{kind}"), 3)
            out.update({f"{new}self_attn.q_proj.{kind}": q, f"{new}self_attn.k_proj.{kind}": k,
                        f"{new}self_attn.v_proj.{kind}": v})
            for a, b in OPEN_CLIP_NAMES.items():
                out[f"{new}{b}.{kind}"] = part.pop(f"{old}{a}.{kind}")
    return out


def _leftovers(out: dict, rest: dict, what: str) -> dict:
    if rest:  # a tensor no block claimed: the config does not describe this checkpoint
        raise CheckpointError(f"{len(rest)} {what} tensors of the single file match no block of the configured "
                              f"model, e.g. {sorted(rest)[:4]}; pass config= a diffusers folder of the same model.")
    return out


def config_folder(state: dict, config, revision: str | None = None, cache_dir=None) -> Path:
    """The diffusers folder that supplies configs, tokenizer and scheduler (`revision` and
    `cache_dir` apply to a repo id given as `config`)."""
    if config is not None:
        folder = hub.resolve(config, revision=revision, cache_dir=cache_dir)
        if not folder.is_dir():
            raise CheckpointError(f"config {str(config)!r} is neither a diffusers folder nor a cached repo id.")
        return folder
    kind, channels = model_type(state)
    repo = DEFAULT_CONFIGS.get((kind, channels))
    if repo is None:
        raise CheckpointError(f"a {kind} U-Net with {channels} input channels has no usual config repo; "
                              "pass config= a diffusers folder of the same model.")
    try:
        return hub.resolve(repo, cache_dir=cache_dir)
    except CheckpointError as e:
        raise CheckpointError(f"single-file {kind.upper()} checkpoint: its configs and tokenizer come from {repo}, "
                              f"which is not in the local Hugging Face cache; pass config= a diffusers folder of "
                              f"the same model, or download the configs (`hf download {repo} --include '*.json' "
                              f"'*.txt'`). ({e})") from None


def load(path, *, config=None, dtype, param_dtype, revision: str | None = None, cache_dir=None):
    """A Pipeline from a single-file SD 1.x/2.x or SDXL checkpoint (see the module's docstring)."""
    from jdiff import convert
    from jdiff.families import stable_diffusion, stable_diffusion_xl
    from jdiff.models.text import CLIPTextConfig
    from jdiff.models.unet import UNetConfig
    from jdiff.models.vae import VAEConfig

    path = paths.as_path(path)
    state = read(path)
    kind, _ = model_type(state)
    folder = config_folder(state, config, revision, cache_dir)
    index_file = folder / "model_index.json"
    index = paths.read_json(index_file) if index_file.is_file() else {}
    parse = lambda cls, name: cls.from_dict(convert.read_json(folder / name / "config.json"),  # noqa: E731
                                            str(folder / name))
    encoders = ("text_encoder_2",) if kind == "sdxl_refiner" else (
        ("text_encoder", "text_encoder_2") if kind == "sdxl" else ("text_encoder",))
    weights = {"unet": unet_state(state, parse(UNetConfig, "unet")), "vae": vae_state(state, parse(VAEConfig, "vae")),
               **text_states(state, kind, {name: parse(CLIPTextConfig, name) for name in encoders})}
    family = stable_diffusion_xl if kind.startswith("sdxl") else stable_diffusion
    pipe = family.load(folder, index, dtype=dtype, param_dtype=param_dtype, weights=weights)
    return dataclasses.replace(pipe, source=str(path))
