"""LoRA files: reading the common formats into adapter trees, and writing them back.

Read: diffusers/PEFT (`unet.<layer>.lora_A.weight`, `transformer.<layer>...` for SD3 and Flux,
`lora_B`, ranks and alphas in the `lora_adapter_metadata` header), diffusers' older spellings (`.lora.down.weight`,
`processor.to_q_lora.down.weight`, `<layer>.alpha`), and kohya / A1111 (`lora_unet_<layer>.lora_down.weight`,
`lora_up`, `.alpha`, text encoders as `lora_te_`, `lora_te1_`, `lora_te2_`), LoCon convolutions
included. Every key must land on a layer of the pipeline: the rest is an error listing them.
"""

import json
import re

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jdiff import paths
from jdiff.errors import CheckpointError
from jdiff.lora import names as lora_names
from jdiff.paths import Path

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights file name
KOHYA_COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2"}
_KOHYA = re.compile(r"(lora_unet|lora_te1|lora_te2|lora_te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_DIFFUSERS = re.compile(r"(?:(unet|transformer|text_encoder_[23]|text_encoder)\.)?(.+?)\.(lora_A\.weight|lora_B\.weight|"
                        r"lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight|"
                        r"lora_linear_layer\.up\.weight|alpha)")
# diffusers' attention-processor LoRA of 2023: attn1.processor.to_q_lora.down.weight, and the text
# encoders' self_attn.to_q_lora.down.weight
_PROCESSOR = re.compile(r"(?:(unet|text_encoder_2|text_encoder)\.)?(.+?)\.(?:processor\.)?"
                        r"(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_PROCESSOR_LAYER = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR_LAYER = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_KIND = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
         "lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
         "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_w1": "LoHa (LyCORIS)",
                "lokr_w1": "LoKr (LyCORIS)", "lora_B.bias": "LoRA with bias", "lora_mid": "LoCon with a Tucker core"}


def lora_file(path) -> Path:
    """The safetensors file of `path`: the file itself, or the LoRA file of a folder."""
    path = paths.as_path(path)
    if path.is_dir():
        files = [path / WEIGHT_NAME] if (path / WEIGHT_NAME).is_file() else sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"LoRA folder {str(path)!r} holds {len(files)} .safetensors files and no "
                                  f"{WEIGHT_NAME}; pass the file to load.")
        return files[0]
    if not path.is_file():
        raise CheckpointError(f"LoRA file {str(path)!r} does not exist.")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{str(path)!r}: jdiff reads LoRA weights from .safetensors files.")
    return path


def read(path) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, header metadata) of a LoRA file or folder."""
    file = lora_file(path)
    try:
        with paths.local_copy(file) as local:
            tensors = safetensors.numpy.load_file(str(local))
            with safetensors.safe_open(str(local), "np") as f:
                metadata = f.metadata() or {}
    except Exception as e:  # truncated or garbled files raise several types
        raise CheckpointError(f"LoRA file {str(file)!r} is corrupt or unreadable: {e}") from None
    return tensors, metadata


def _peft_settings(metadata: dict) -> dict[str, dict]:
    """{component: PEFT LoraConfig fields} from diffusers' `lora_adapter_metadata` header."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"the LoRA file's lora_adapter_metadata is not valid JSON: {e}") from None
    settings = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        settings.setdefault(component, {})[field] = value
    return settings


def _pattern_value(patterns: dict, name: str):
    """PEFT's rank/alpha pattern lookup: a key matches a layer name that ends with it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def parse(tensors: dict[str, np.ndarray], metadata: dict) -> dict[str, dict[str, dict]]:
    """{component: {layer name as the file spells it: {"down", "up", "alpha"}}} in PyTorch layouts.

    alpha: the file's (a `.alpha` tensor or PEFT's lora_alpha/alpha_pattern), else the rank."""
    for marker, kind in _UNSUPPORTED.items():
        found = [k for k in tensors if marker in k]
        if found:
            raise CheckpointError(f"this LoRA file holds {kind} weights (e.g. {found[0]!r}), which jdiff does "
                                  f"not load; plain LoRA and LoCon are supported.")
    layers: dict[str, dict[str, dict]] = {}
    unknown = []
    for key, value in tensors.items():
        if m := _KOHYA.fullmatch(key):
            component, name, kind = KOHYA_COMPONENTS[m[1]], m[2], _KIND[m[3]]
        elif m := _PROCESSOR.fullmatch(key):
            component = m[1] or "unet"
            table = _PROCESSOR_LAYER if component == "unet" else _TEXT_PROCESSOR_LAYER
            name, kind = f"{m[2]}.{table[m[3]]}", m[4]
        elif m := _DIFFUSERS.fullmatch(key):
            component, name, kind = m[1] or "unet", m[2], _KIND[m[3]]
        else:
            unknown.append(key)
            continue
        layers.setdefault(component, {}).setdefault(name, {})[kind] = value
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys of the LoRA file are in no LoRA format jdiff reads, "
                              f"e.g. {unknown[:5]}.")
    settings = _peft_settings(metadata)
    for component, by_name in layers.items():
        peft = settings.get(component, {})
        # A file whose layers carry alphas for some layers only: the others take the most common
        # one, as diffusers does (with none at all, alpha = rank).
        given = [float(np.asarray(layer["alpha"]).reshape(())) for layer in by_name.values() if "alpha" in layer]
        common = max(set(given), key=given.count) if given else None
        for name, layer in by_name.items():
            if "down" not in layer or "up" not in layer:
                raise CheckpointError(f"LoRA layer {component}.{name} has no {'up' if 'down' in layer else 'down'} "
                                      f"matrix.")
            rank = layer["down"].shape[0]
            alpha = layer.get("alpha")
            if alpha is None:
                alpha = _pattern_value(peft.get("alpha_pattern"), name) or peft.get("lora_alpha") or common or rank
            alpha = float(np.asarray(alpha).reshape(()))
            if peft.get("use_rslora"):  # PEFT's rank-stabilised scaling alpha/sqrt(r), as alpha'/r
                alpha *= rank ** 0.5
            if peft.get("use_dora"):
                raise CheckpointError("this LoRA file is DoRA (use_dora), which jdiff does not load.")
            layer["alpha"] = alpha
    return layers


def _flax_layer(torch_layer: dict, kernel_shape: tuple, where: str) -> dict:
    """down [in, r] / [kh, kw, in, r] and up [r, out] from PyTorch's [r, in(, kh, kw)] and [out, r(, 1, 1)],
    checked against the adapted layer's kernel (jdiff layout)."""
    down, up = np.asarray(torch_layer["down"], np.float32), np.asarray(torch_layer["up"], np.float32)
    rank = down.shape[0]
    if up.ndim == 4:
        if up.shape[2:] != (1, 1):
            raise CheckpointError(f"{where}: the up matrix of a convolution's LoRA must be 1x1, got {up.shape}.")
        up = up[:, :, 0, 0]
    if up.ndim != 2 or up.shape[1] != rank:
        raise CheckpointError(f"{where}: up {up.shape} does not match down {down.shape} (rank {rank}).")
    if down.ndim == 4:
        down = down.transpose(2, 3, 1, 0)  # [kh, kw, in, r]
    elif down.ndim == 2:
        down = down.T  # [in, r]
    else:
        raise CheckpointError(f"{where}: down matrix of shape {down.shape} is neither linear nor convolutional.")
    if len(kernel_shape) == 2:
        if down.ndim == 4 and down.shape[:2] == (1, 1):
            down = down[0, 0]
        expected = (kernel_shape[0], rank)
    else:
        if down.ndim == 2:
            down = down[None, None]
        expected = tuple(kernel_shape[:3]) + (rank,)
    if down.shape != expected or up.shape[0] != kernel_shape[-1]:
        raise CheckpointError(f"{where}: LoRA matrices down {torch_layer['down'].shape}, up {torch_layer['up'].shape} "
                              f"do not fit the layer's weight (jdiff kernel {kernel_shape}): a LoRA for another model?")
    return {"down": jnp.asarray(down), "up": jnp.asarray(up.T), "alpha": jnp.float32(torch_layer["alpha"])}


def to_adapter(parsed: dict[str, dict[str, dict]], params: dict, source: str) -> dict:
    """The adapter tree {component: {jdiff layer path: {"down", "up", "alpha"}}} for a pipeline
    with `params`; every layer must exist in it."""
    adapter, unmatched = {}, []
    for component, by_name in parsed.items():
        if component not in params:
            raise CheckpointError(f"{source} adapts {component!r}, which this pipeline does not have "
                                  f"(it has {', '.join(sorted(params))}).")
        table = lora_names.name_table(component, params[component])
        kernels = lora_names.adaptable_layers(params[component])
        for name, layer in by_name.items():
            path = table.get(name)
            if path is None:
                unmatched.append(f"{component}.{name}")
                continue
            if path in adapter.get(component, {}):
                raise CheckpointError(f"{source}: the {component} layer {lora_names.dotted_name(path)} appears twice "
                                      f"in the file, under two spellings of its name (e.g. {name!r}).")
            adapter.setdefault(component, {})[path] = _flax_layer(layer, kernels[path], f"{source}: {component}.{name}")
    if unmatched:
        raise CheckpointError(f"{source}: {len(unmatched)} LoRA layers match no layer of this pipeline, e.g. "
                              f"{unmatched[:5]}; is it a LoRA for another model family or size?")
    if not adapter:
        raise CheckpointError(f"{source} holds no LoRA layers.")
    return adapter


# --- writing ---------------------------------------------------------------------------------------


def _torch_layer(layer) -> tuple[np.ndarray, np.ndarray]:
    down, up = np.asarray(layer["down"], np.float32), np.asarray(layer["up"], np.float32)
    down = down.transpose(3, 2, 0, 1) if down.ndim == 4 else down.T
    up = up.T
    if down.ndim == 4:
        up = up[:, :, None, None]
    return np.ascontiguousarray(down), np.ascontiguousarray(up)


def tensors_peft(adapter: dict) -> tuple[dict[str, np.ndarray], dict]:
    """diffusers' `save_lora_weights` format: tensors and the lora_adapter_metadata header."""
    tensors, metadata = {}, {}
    for component, layers in adapter.items():
        ranks, alphas = {}, {}
        for path, layer in layers.items():
            name = lora_names.dotted_name(path)
            tensors[f"{component}.{name}.lora_A.weight"], tensors[f"{component}.{name}.lora_B.weight"] = \
                _torch_layer(layer)
            # PEFT matches targets by suffix: without `text_model.` they fit CLIP under transformers 4 and 5.
            target = name.removeprefix("text_model.")
            ranks[target], alphas[target] = int(layer["down"].shape[-1]), float(layer["alpha"])
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        metadata.update({
            f"{component}.r": rank, f"{component}.lora_alpha": alpha,
            f"{component}.target_modules": sorted(ranks),
            f"{component}.rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank},
            f"{component}.alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
            f"{component}.peft_type": "LORA", f"{component}.bias": "none", f"{component}.use_dora": False,
            f"{component}.use_rslora": False,
        })
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, indent=2, sort_keys=True)}


def tensors_kohya(adapter: dict, prefixes: dict[str, str], sgm_unet: bool, params: dict) -> dict[str, np.ndarray]:
    """kohya's sd-scripts format: lora_down/lora_up/alpha per layer, prefixes per component."""
    tensors = {}
    for component, layers in adapter.items():
        for path, layer in layers.items():
            name = f"{prefixes[component]}_{lora_names.preferred_kohya_name(component, path, sgm_unet, params[component])}"
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = _torch_layer(layer)
            tensors[f"{name}.alpha"] = np.asarray(layer["alpha"], np.float32).reshape(())
    return tensors


def write(path, tensors: dict[str, np.ndarray], metadata: dict) -> Path:
    """Writes a LoRA file: `path` itself when it ends in .safetensors, else <path>/pytorch_lora_weights.safetensors."""
    path = paths.as_path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / WEIGHT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_file(path, lambda p: safetensors.numpy.save_file(tensors, p, metadata=metadata))
    return path
