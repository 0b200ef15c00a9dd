"""diffusers/transformers safetensors folders <-> jdiff Flax modules and parameters.

Flax parameter paths mirror the PyTorch state-dict keys: `down_blocks_0/resnets_1/conv1/kernel` is
`down_blocks.0.resnets.1.conv1.weight`. Conversion is therefore a rename plus a layout change
(conv OIHW <-> HWIO, linear [out, in] <-> [in, out]), driven by the parameter tree that the config
implies, so every tensor is checked for presence and shape against the config.
"""

import dataclasses
import json
import re
import tempfile
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from jdiff import paths, shape_cache
from jdiff.errors import CheckpointError
from jdiff.paths import Path

# PyTorch ModuleLists: Flax names their items `name_i`, PyTorch keys them `name.i`.
_LIST_MODULES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                 "transformer_blocks", "single_transformer_blocks", "to_out", "net", "layers", "block", "layer")
_LIST_ITEM = re.compile(rf"({'|'.join(_LIST_MODULES)})_(\d+)")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Buffers that the reference libraries may store but that are not parameters.
_IGNORED_KEYS = re.compile(r".*(position_ids|num_batches_tracked)$")


def torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of a Flax parameter path."""
    *modules, leaf = path
    parts = [(f"{m[1]}.{m[2]}" if (m := _LIST_ITEM.fullmatch(p)) else p) for p in modules]
    return ".".join(parts + [_LEAF_NAMES.get(leaf, leaf)])


def to_torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    return array


def to_flax_layout(path: tuple[str, ...], tensor: np.ndarray, flax_ndim: int) -> np.ndarray:
    if path[-1] == "kernel":
        if tensor.ndim == 4 and flax_ndim == 2 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]  # old checkpoints stored some linear layers as 1x1 convs
        return tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T
    return tensor


def torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return to_torch_layout(path, np.empty(flax_shape, dtype=np.bool_)).shape


# ----------------------------------------------------------------------------------------------
# Reading and writing folders.


def _require_folder(folder) -> Path:
    folder = paths.as_path(folder)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist.")
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is a file, not a checkpoint folder.")
    return folder


read_json = paths.read_json


def _weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of a component folder: sharded (with an index) or single. With a
    `variant` (diffusers' `variant="fp16"`), its files where the folder has them: `*.fp16.safetensors`
    or `*.safetensors.index.fp16.json`; otherwise the files that name no variant."""
    def is_variant(name: str) -> bool:  # model.fp16.safetensors, model-00001-of-00002.fp16.safetensors
        return len(name.removesuffix(".safetensors").split(".")) > 1

    indices = sorted(folder.glob(f"*.safetensors.index.{variant}.json")) if variant else []
    files = sorted(folder.glob(f"*.{variant}.safetensors")) if variant else []
    if variant and not indices and not files:
        # As diffusers: a component without the variant loads its default files (the pipeline
        # checks that some component has it).
        warnings.warn(f"{str(folder)!r} has no {variant!r} weights (*.{variant}.safetensors); loading its default files.")
    if not indices and not files:
        indices = sorted(folder.glob("*.safetensors.index.json"))
        files = sorted(folder.glob("*.safetensors"))
        files = [f for f in files if not is_variant(f.name)] or files  # a download of one variant only loads it
    if indices:
        weight_map = read_json(indices[0]).get("weight_map", {})
        return sorted({folder / name for name in weight_map.values()})
    plain = [f for f in files if f.name in ("diffusion_pytorch_model.safetensors", "model.safetensors")]
    if plain or len(files) == 1:
        return plain or files
    if files:
        raise CheckpointError(
            f"{str(folder)!r} holds several weight files ({', '.join(f.name for f in files)}) and no "
            "index; keep only the one to load."
        )
    pickled = [f.name for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickled:
        raise CheckpointError(
            f"{str(folder)!r} has weights only as PyTorch pickles ({', '.join(sorted(pickled))}). jdiff "
            "reads safetensors: re-save them with diffusers/transformers "
            "`save_pretrained(folder, safe_serialization=True)`."
        )
    raise CheckpointError(f"{str(folder)!r} holds no .safetensors weights.")


# Checkpoints written before diffusers 0.14 (many SD1.x/2.x `vae/` folders) name the VAE's
# mid-block attention projections differently; diffusers renames them on load, and so do we.
_LEGACY_ATTENTION = re.compile(r"(.*mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_key(key: str) -> str:
    m = _LEGACY_ATTENTION.fullmatch(key)
    return f"{m[1]}{_LEGACY_NAMES[m[2]]}.{m[3]}" if m else key


def read_state_dict(folder, variant: str | None = None) -> dict[str, np.ndarray]:
    state = {}
    for path in _weight_files(_require_folder(folder), variant):
        if not path.is_file():
            raise CheckpointError(f"weight file {str(path)!r} (named in the index) is missing.")
        try:
            with paths.local_copy(path) as local:  # safetensors memory-maps a local file
                tensors = safetensors.numpy.load_file(str(local))
        except Exception as e:  # safetensors raises several types for truncated or garbled files
            raise CheckpointError(f"weight file {str(path)!r} is corrupt or unreadable: {e}") from None
        state.update((_modern_key(k), v) for k, v in tensors.items())
    return state


def params_from_state_dict(state: dict[str, np.ndarray], shapes, source: str):
    """Flax params shaped like `shapes` (a tree of ShapeDtypeStruct) from a PyTorch state dict.

    Consumes `state`: each tensor is dropped once converted, so loading needs about one copy of
    the weights in memory rather than two (SDXL's U-Net is 10 GB in float32)."""
    flat_shapes = traverse_util.flatten_dict(shapes)
    params, missing = {}, []
    for path, spec in flat_shapes.items():
        key = torch_key(path)
        if key not in state:
            missing.append(key)
            continue
        tensor = state[key]
        expected = torch_shape(path, spec.shape)
        if tensor.ndim == 4 and len(expected) == 2 and tensor.shape[2:] == (1, 1):
            got = tensor.shape[:2]
        else:
            got = tensor.shape
        if tuple(got) != tuple(expected):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but the config implies "
                f"{tuple(expected)}."
            )
        params[path] = jnp.asarray(to_flax_layout(path, tensor, len(spec.shape)), dtype=spec.dtype)
        del state[key], tensor
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors are missing, e.g. {missing[:5]}.")
    unexpected = sorted(k for k in state if not _IGNORED_KEYS.match(k))
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} tensors are not part of the configured model, "
            f"e.g. {unexpected[:5]}."
        )
    return traverse_util.unflatten_dict(params)


def state_dict_from_params(params) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return {torch_key(p): np.ascontiguousarray(to_torch_layout(p, np.asarray(v))) for p, v in flat.items()}


def write_folder(folder, config: dict, state: dict[str, np.ndarray], weights_name: str) -> None:
    folder = paths.as_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths.write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    paths.write_file(folder / weights_name, lambda p: safetensors.numpy.save_file(state, p, metadata={"format": "pt"}))


# ----------------------------------------------------------------------------------------------
# Components.


@dataclasses.dataclass(frozen=True)
class Component:
    """How one kind of model is found in, built from, and written to a checkpoint folder."""

    class_names: tuple[str, ...]  # `_class_name` (diffusers) or `architectures` (transformers)
    weights_name: str
    parse_config: Callable[[dict, str], Any]
    build: Callable[..., Any]  # the Flax module class: (config, dtype=, param_dtype=, **options)
    example_inputs: Callable[[Any], tuple]  # config -> arguments for module.init
    config_header: dict  # written in front of the config's own fields
    canonical_keys: Callable[[dict], dict] = lambda state: state  # undo known key-naming variants
    # Constant buffers the reference stores in its weights but jdiff computes: config -> {key: array}.
    # Checked against the stored ones on load (a mismatch means a different model), written on save.
    buffers: Callable[[Any], dict] = lambda config: {}


def _class_name(raw: dict) -> str:
    return raw.get("_class_name") or (raw.get("architectures") or [""])[0]


def load_component(kind: Component, folder, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None,
                   state: dict | None = None, **options):
    """(module, params) of one component: the module from `folder`'s config.json, the weights from
    its safetensors (or from `state`, a diffusers-keyed state dict: a single-file checkpoint's part)."""
    folder = _require_folder(folder)
    source = str(folder / "config.json")
    raw = read_json(folder / "config.json")
    name = _class_name(raw)
    if name and name not in kind.class_names:
        raise CheckpointError(f"{source}: this folder holds a {name}, not a {kind.class_names[0]}.")
    config = kind.parse_config(raw, source)
    module = kind.build(config, dtype=dtype, param_dtype=param_dtype, **options)
    shapes = param_shapes(kind, module)
    state = kind.canonical_keys(read_state_dict(folder, variant) if state is None else state)
    for key, expected in kind.buffers(config).items():
        stored = state.pop(key, None)
        # Released files store it in float16 or bfloat16 (rounding up to ~1e-2); another config's
        # table differs by far more.
        if stored is not None and (stored.shape != expected.shape
                                   or not np.allclose(np.asarray(stored, np.float32), expected, atol=2e-2)):
            raise CheckpointError(f"{folder}: buffer {key!r} {tuple(stored.shape)} is not the one the config implies "
                                  f"{tuple(expected.shape)}; the config does not describe these weights.")
    params = params_from_state_dict(state, shapes, source=str(folder))
    return module, params


def param_shapes(kind: Component, module):
    """Parameter shapes and dtypes of `module`, without allocating them (traced once per config and
    kept on disk: jdiff.shape_cache)."""
    inputs = kind.example_inputs(module.config)
    trace = lambda: jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
    return shape_cache.param_shapes(module, inputs, trace)


def save_component(kind: Component, module, params, folder) -> None:
    config = {**kind.config_header, **module.config.to_dict()}
    state = {**state_dict_from_params(params), **kind.buffers(module.config)}
    write_folder(folder, config, state, kind.weights_name)


_DIFFUSERS_VERSION = "0.42.1"  # in the configs jdiff writes, as diffusers' save_pretrained records its own


def _diffusers_model(model_type, config_type, example_inputs, **fields) -> Component:
    """A diffusers model component, whose `_class_name` is the Flax module's class name."""
    name = model_type.__name__
    return Component(class_names=(name,), weights_name="diffusion_pytorch_model.safetensors",
                     parse_config=config_type.from_dict, build=model_type, example_inputs=example_inputs,
                     config_header={"_class_name": name, "_diffusers_version": _DIFFUSERS_VERSION}, **fields)


def _unet() -> Component:
    from jdiff.models import unet

    return _diffusers_model(unet.UNet2DConditionModel, unet.UNetConfig, unet.example_inputs)


def _vae() -> Component:
    from jdiff.models import vae

    return _diffusers_model(vae.AutoencoderKL, vae.VAEConfig, vae.example_inputs)


def _sd3_transformer() -> Component:
    from jdiff.models import sd3_transformer

    return _diffusers_model(sd3_transformer.SD3Transformer2DModel, sd3_transformer.SD3TransformerConfig,
                            sd3_transformer.example_inputs,
                            buffers=lambda config: {"pos_embed.pos_embed": config.position_embedding()})


def _flux_transformer() -> Component:
    from jdiff.models import flux_transformer

    return _diffusers_model(flux_transformer.FluxTransformer2DModel, flux_transformer.FluxTransformerConfig,
                            flux_transformer.example_inputs)


def _with_text_model_prefix(state: dict) -> dict:
    """transformers 5 saves a CLIPTextModel's keys without the `text_model.` prefix that
    CLIPTextModelWithProjection and released checkpoints use; accept both."""
    if any(k.startswith("text_model.") for k in state):
        return state
    return {(k if k.startswith("text_projection.") else f"text_model.{k}"): v for k, v in state.items()}


def _text_encoder() -> Component:
    from jdiff.models import text

    return Component(
        class_names=("CLIPTextModel", "CLIPTextModelWithProjection"),
        weights_name="model.safetensors",
        parse_config=text.CLIPTextConfig.from_dict,
        build=text.CLIPTextModel,
        example_inputs=text.example_inputs,
        config_header={"model_type": "clip_text_model"},
        canonical_keys=_with_text_model_prefix,
    )


def _untied_t5_embedding(state: dict) -> dict:
    """T5 ties `encoder.embed_tokens` to `shared`; some files store both, some only one."""
    tied = state.pop("encoder.embed_tokens.weight", None)
    if tied is not None and "shared.weight" not in state:
        state["shared.weight"] = tied
    return state


def _t5_encoder() -> Component:
    from jdiff.models import t5

    return Component(
        class_names=("T5EncoderModel",),
        weights_name="model.safetensors",
        parse_config=t5.T5Config.from_dict,
        build=t5.T5EncoderModel,
        example_inputs=t5.example_inputs,
        config_header={},
        canonical_keys=_untied_t5_embedding,
    )


# ----------------------------------------------------------------------------------------------
# Public entry points. Each `load_*` returns (module, params); `save_*` writes the same format.


def load_unet(folder, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None, **options):
    """U-Net from a diffusers `unet/` folder. options: e.g. `gradient_checkpointing=True`."""
    return load_component(_unet(), folder, dtype=dtype, param_dtype=param_dtype, variant=variant, **options)


def load_vae(folder, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None, **options):
    """AutoencoderKL from a diffusers `vae/` folder."""
    return load_component(_vae(), folder, dtype=dtype, param_dtype=param_dtype, variant=variant, **options)


def load_text_encoder(folder, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None, **options):
    """CLIP text transformer from a transformers `text_encoder/` folder."""
    return load_component(_text_encoder(), folder, dtype=dtype, param_dtype=param_dtype, variant=variant, **options)


def load_sd3_transformer(folder, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None, **options):
    """SD3/SD3.5 MMDiT from a diffusers `transformer/` folder. options: `gradient_checkpointing=True`."""
    return load_component(_sd3_transformer(), folder, dtype=dtype, param_dtype=param_dtype, variant=variant, **options)


def load_flux_transformer(folder, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None, **options):
    """Flux.1 transformer from a diffusers `transformer/` folder. options: `gradient_checkpointing=True`."""
    return load_component(_flux_transformer(), folder, dtype=dtype, param_dtype=param_dtype, variant=variant, **options)


def load_t5_encoder(folder, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None, **options):
    """T5 encoder from a transformers `T5EncoderModel` folder (SD3's `text_encoder_3/`, Flux's
    `text_encoder_2/`), single or sharded safetensors."""
    return load_component(_t5_encoder(), folder, dtype=dtype, param_dtype=param_dtype, variant=variant, **options)


def load_vae_upcast(folder, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None, state=None):
    """AutoencoderKL as the SDXL, SD3 and Flux pipelines run it: where its config says
    `force_upcast` (the VAE overflows in float16/bfloat16) it computes in float32 whatever `dtype`
    says."""
    force_upcast = read_json(paths.as_path(folder) / "config.json").get("force_upcast", True)
    return load_vae(folder, dtype=jnp.float32 if force_upcast else dtype, param_dtype=param_dtype, variant=variant,
                    state=state)


def save_unet(module, params, folder) -> None:
    save_component(_unet(), module, params, folder)


def save_vae(module, params, folder) -> None:
    save_component(_vae(), module, params, folder)


def save_text_encoder(module, params, folder) -> None:
    save_component(_text_encoder(), module, params, folder)


def save_sd3_transformer(module, params, folder) -> None:
    save_component(_sd3_transformer(), module, params, folder)


def save_flux_transformer(module, params, folder) -> None:
    save_component(_flux_transformer(), module, params, folder)


def save_t5_encoder(module, params, folder) -> None:
    save_component(_t5_encoder(), module, params, folder)


# The kinds `random_component` builds, by the name of what they are.
_KINDS = {"unet": _unet, "vae": _vae, "clip_text": _text_encoder, "t5_encoder": _t5_encoder,
          "sd3_transformer": _sd3_transformer, "flux_transformer": _flux_transformer}


def random_component(kind: str, config: dict, rng, *, dtype=jnp.float32, param_dtype=jnp.float32, **options):
    """(module, params) of one component built from `config` (the fields of its diffusers or
    transformers config.json) with freshly initialised parameters, created on the default device
    by one compiled call (never on the host): benchmarks and shape checks without weight files.
    kind: one of "unet", "vae", "clip_text", "t5_encoder", "sd3_transformer", "flux_transformer"."""
    if kind not in _KINDS:
        raise ValueError(f"unknown component kind {kind!r}; use one of {', '.join(_KINDS)}.")
    component = _KINDS[kind]()
    module = component.build(component.parse_config(dict(config), f"{kind} config"), dtype=dtype,
                             param_dtype=param_dtype, **options)
    inputs = component.example_inputs(module.config)
    return module, jax.jit(lambda key: module.init(key, *inputs)["params"])(rng)


# ControlNet, a component of its own (diffusers keeps it outside the pipeline folder). Two of its
# ModuleLists exist in no other model; their items are renamed here, in both directions.
_CONTROLNET_TORCH_ITEM = re.compile(r"^(controlnet_down_blocks|controlnet_cond_embedding\.blocks)\.(\d+)\.")
_CONTROLNET_FLAX_ITEM = re.compile(r"^(controlnet_down_blocks|controlnet_cond_embedding\.blocks)_(\d+)\.")


def _controlnet() -> Component:
    from jdiff.models import controlnet

    return _diffusers_model(controlnet.ControlNetModel, controlnet.ControlNetConfig, controlnet.example_inputs,
                            canonical_keys=lambda state: {_CONTROLNET_TORCH_ITEM.sub(r"\1_\2.", k): v
                                                          for k, v in state.items()})


def load_controlnet(folder, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None, **options):
    """ControlNet (SD 1.x/2.x or SDXL) from a diffusers ControlNetModel folder. options: e.g.
    `gradient_checkpointing=True`."""
    return load_component(_controlnet(), folder, dtype=dtype, param_dtype=param_dtype, variant=variant, **options)


def save_controlnet(module, params, folder) -> None:
    kind = _controlnet()
    state = {_CONTROLNET_FLAX_ITEM.sub(r"\1.\2.", k): v for k, v in state_dict_from_params(params).items()}
    write_folder(folder, {**kind.config_header, **module.config.to_dict()}, state, kind.weights_name)


# The CLIP image encoder of IP-Adapter (a pipeline's `image_encoder/`, or the `image_encoder` folder
# of an IP-Adapter repository), a transformers CLIPVisionModelWithProjection folder.
def _clip_vision() -> Component:
    from jdiff.models import clip_vision

    return Component(
        class_names=(clip_vision.ARCHITECTURE,),
        weights_name="model.safetensors",
        parse_config=clip_vision.CLIPVisionConfig.from_dict,
        build=clip_vision.CLIPVisionModelWithProjection,
        example_inputs=clip_vision.example_inputs,
        config_header={},
    )


def load_clip_vision(folder, *, dtype=jnp.float32, param_dtype=jnp.float32, variant=None, **options):
    """CLIP image encoder (CLIPVisionModelWithProjection) from a transformers folder; its pixels come
    from `jdiff.models.clip_preprocess.preprocess`."""
    return load_component(_clip_vision(), folder, dtype=dtype, param_dtype=param_dtype, variant=variant, **options)


def save_clip_vision(module, params, folder) -> None:
    save_component(_clip_vision(), module, params, folder)


def load_tokenizer(folder, max_length: int = 77):
    """`transformers.CLIPTokenizer` from a `tokenizer/` folder: vocab.json + merges.txt (the
    slow format of released checkpoints) or tokenizer.json (what transformers 5 writes)."""
    from transformers import CLIPTokenizer

    folder = _require_folder(folder)
    has_bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe_files and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"tokenizer folder {str(folder)!r} has neither vocab.json + merges.txt "
                              f"nor tokenizer.json.")
    with paths.local_copy(folder) as local:  # transformers reads local files only
        tokenizer = CLIPTokenizer.from_pretrained(str(local), local_files_only=True)
    if len(tokenizer) < 3:
        raise CheckpointError(f"tokenizer in {str(folder)!r} loaded with an empty vocabulary.")
    tokenizer.model_max_length = max_length
    return tokenizer


def save_tokenizer(tokenizer, folder) -> None:
    """`tokenizer.save_pretrained(folder)` for any folder: transformers writes local files only."""
    folder = paths.as_path(folder)
    if paths.is_local(folder):
        tokenizer.save_pretrained(str(folder))
        return
    with tempfile.TemporaryDirectory(prefix="jdiff-tokenizer-") as local:
        tokenizer.save_pretrained(local)
        paths.copy_tree(local, folder)


def load_t5_tokenizer(folder, max_length: int = 256):
    """`transformers.T5TokenizerFast` from a folder with tokenizer.json (as SD3's
    `tokenizer_3/` and Flux's `tokenizer_2/` ship it). max_length: the pipeline's
    `max_sequence_length` (diffusers: 256 for SD3, 512 for Flux-dev, 256 for Flux-schnell)."""
    from transformers import T5TokenizerFast

    folder = _require_folder(folder)
    if not (folder / "tokenizer.json").is_file():
        only_spiece = " (it has spiece.model only; re-save it with transformers' T5TokenizerFast)" \
            if (folder / "spiece.model").is_file() else ""
        raise CheckpointError(f"T5 tokenizer folder {str(folder)!r} has no tokenizer.json{only_spiece}.")
    with paths.local_copy(folder) as local:
        tokenizer = T5TokenizerFast.from_pretrained(str(local), local_files_only=True)
    tokenizer.model_max_length = max_length
    return tokenizer
