"""LoRA adapters: load the common file formats, apply them unmerged (per-image scales, no
recompile when scales change) or merged, and save them.

    pipe = jdiff.load_lora_weights(pipe, "style.safetensors", adapter_name="style")
    pipe = jdiff.load_lora_weights(pipe, "lora_folder/", adapter_name="subject")
    images = jdiff.generate(pipe, prompts, lora_scales={"style": 0.8, "subject": 0.5})
    images = jdiff.generate(pipe, ["a", "b"], lora_scales=[{"style": 1.0}, {"subject": 1.0}])  # per image
    fused = jdiff.fuse_lora(pipe, {"style": 0.8})         # merged into the weights, adapters dropped
    jdiff.save_lora_weights(pipe, "out/", adapter_name="style", format="kohya")

Loading never copies or changes the base parameters: a pipeline with adapters shares them with the
pipeline it came from.
"""

import dataclasses
from typing import Mapping, Optional

import numpy as np
from flax import traverse_util

from jdiff.errors import CheckpointError, ConfigError
from jdiff.families.base import Pipeline
from jdiff.lora import formats
from jdiff.lora.apply import merged_kernel, scale_matrix, with_adapters

__all__ = ["fuse_lora", "load_lora_weights", "save_lora_weights", "scales_for", "unload_lora_weights", "with_adapters"]
FORMATS = ("peft", "kohya")


def load_lora_weights(pipe: Pipeline, path, adapter_name: Optional[str] = None) -> Pipeline:
    """`pipe` with the LoRA of `path` (a .safetensors file, or a folder as diffusers'
    `save_lora_weights` writes it) added as `adapter_name` (default: default_0, default_1, ...)."""
    name = adapter_name or f"default_{len(pipe.adapters)}"
    if name in pipe.adapters:
        raise ConfigError(f"an adapter named {name!r} is already loaded; pick another adapter_name "
                          f"(loaded: {list(pipe.adapters)}).")
    tensors, metadata = formats.read(path)
    if not tensors:
        raise CheckpointError(f"LoRA file {str(path)!r} holds no tensors.")
    trainable = {c: pipe.params[c] for c in pipe.params if c != "vae"}
    adapter = formats.to_adapter(formats.parse(tensors, metadata), trainable, str(path))
    return _with_adapters(pipe, {**pipe.adapters, name: adapter})


def unload_lora_weights(pipe: Pipeline, adapter_name: Optional[str] = None) -> Pipeline:
    """`pipe` without the named adapter (or without any)."""
    if adapter_name is None:
        return _with_adapters(pipe, {})
    _require(pipe, [adapter_name])
    return _with_adapters(pipe, {k: v for k, v in pipe.adapters.items() if k != adapter_name})


def fuse_lora(pipe: Pipeline, lora_scales: Optional[Mapping[str, float]] = None) -> Pipeline:
    """`pipe` with the adapters named in `lora_scales` (default: every one, at 1.0) merged into
    its weights and removed; adapters not named stay loaded, unmerged. Generation with only merged
    adapters runs at the base model's speed."""
    scales = dict.fromkeys(pipe.adapters, 1.0) if lora_scales is None else dict(lora_scales)
    _require(pipe, list(scales))
    params = dict(pipe.params)
    for name, scale in scales.items():
        for component, layers in pipe.adapters[name].items():
            flat = traverse_util.flatten_dict(params[component])
            for path, layer in layers.items():
                key = tuple(path.split("/")) + ("kernel",)
                flat[key] = merged_kernel(flat[key], layer, float(scale))
            params[component] = traverse_util.unflatten_dict(flat)
    return pipe.replace(params=params, adapters={k: v for k, v in pipe.adapters.items() if k not in scales})


def save_lora_weights(pipe: Pipeline, path, adapter_name: Optional[str] = None, format: str = "peft"):
    """Writes one adapter: `format="peft"` as diffusers' `save_lora_weights` (which diffusers'
    `load_lora_weights` reads), or "kohya" (A1111/ComfyUI). `path`: a .safetensors file, or a folder
    (then <path>/pytorch_lora_weights.safetensors). Returns the file written."""
    if format not in FORMATS:
        raise ConfigError(f"unknown LoRA format {format!r}; use one of {FORMATS}.")
    if adapter_name is None:
        if len(pipe.adapters) != 1:
            raise ConfigError(f"name the adapter to save (adapter_name); loaded: {list(pipe.adapters)}.")
        adapter_name = next(iter(pipe.adapters))
    _require(pipe, [adapter_name])
    adapter = pipe.adapters[adapter_name]
    if format == "peft":
        tensors, metadata = formats.tensors_peft(adapter)
    else:
        tensors = formats.tensors_kohya(adapter, pipe.family.kohya_prefixes, pipe.family.kohya_sgm_unet, pipe.params)
        metadata = {"format": "pt"}
    return formats.write(path, tensors, metadata)


def scales_for(pipe: Pipeline, lora_scales, batch: int) -> Optional[np.ndarray]:
    """generate()'s [batch, n_adapters] scale matrix, or None for a pipeline without adapters."""
    if not pipe.adapters:
        if lora_scales:
            raise ConfigError("lora_scales given but no LoRA is loaded (jdiff.load_lora_weights).")
        return None
    return scale_matrix(pipe.adapters, lora_scales, batch)


def _with_adapters(pipe: Pipeline, adapters: dict) -> Pipeline:
    """`pipe` with other adapters; the same weights, so the same weights already placed on devices."""
    return dataclasses.replace(pipe, adapters=adapters)


def _require(pipe: Pipeline, names) -> None:
    missing = [n for n in names if n not in pipe.adapters]
    if missing:
        raise ConfigError(f"no adapter named {missing}; loaded: {list(pipe.adapters)}.")
