"""Applying loaded adapters: unmerged and batched (per-image scales), or merged into the weights.

An adapter is a tree {component: {layer path: {"down", "up", "alpha"}}} in jdiff's layouts: `down`
is [in, r] (or [kh, kw, in, r] for a convolution), `up` is [r, out], and the update of a layer's
output is  scale * alpha / r * up(down(x)),  as diffusers/PEFT apply it.

Unmerged application wraps a component's Flax module so that every adapted layer's call adds its
update (a Flax method interceptor: the models themselves know nothing of LoRA). The scales are a
traced [B, n_adapters] array, one row per image, so changing them, or mixing adapters within a
batch, reuses one compiled program.
"""

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding
from jax import lax

from jdiff.errors import ConfigError


def layer_scale(layer) -> jax.Array:
    return jnp.asarray(layer["alpha"], jnp.float32) / layer["down"].shape[-1]


def _update(module, x, layer, scale):
    """scale * alpha/r * up(down(x)) for one layer of `module`; scale: [B] or [1]."""
    dtype = getattr(module, "dtype", None) or x.dtype
    down, up = jnp.asarray(layer["down"], dtype), jnp.asarray(layer["up"], dtype)
    x = x.astype(dtype)
    if down.ndim == 4 and down.shape[:2] != (1, 1):  # a convolution's LoRA (LoCon): same window, r outputs
        rank = len(module.kernel_size)
        strides = module.strides or 1
        dilation = module.kernel_dilation or 1
        hidden = lax.conv_general_dilated(
            x, down, (strides,) * rank if isinstance(strides, int) else tuple(strides),
            canonicalize_padding(module.padding, rank),
            rhs_dilation=(dilation,) * rank if isinstance(dilation, int) else tuple(dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
        hidden = x @ down.reshape(down.shape[-2:])
    scale = (scale * layer_scale(layer)).astype(dtype)
    hidden = hidden * scale.reshape((-1,) + (1,) * (hidden.ndim - 1))
    return hidden @ up


def _rows(scales: jax.Array, batch: int) -> jax.Array:
    """The per-image scales [S, n] laid out for a call on `batch` rows: the same S images repeated
    (classifier-free guidance runs [unconditional; conditional] halves), or one row for all."""
    if scales.shape[0] == 1 or batch == scales.shape[0]:
        return scales
    if batch % scales.shape[0] == 0:
        return jnp.tile(scales, (batch // scales.shape[0], 1))
    raise ConfigError(f"LoRA scales are given for {scales.shape[0]} images but a layer runs on {batch} rows.")


class WithAdapters:
    """A Flax module stand-in: `apply` runs the module with the adapters' updates added; every
    other attribute (config, ...) is the module's own."""

    def __init__(self, module, layers: Mapping[str, list], scales: jax.Array):
        self._module, self._layers, self._scales = module, layers, scales

    def __getattr__(self, name):
        return getattr(self._module, name)

    def apply(self, variables, *args, **kwargs):
        active = set()

        def interceptor(next_fun, call_args, call_kwargs, context):
            path = "/".join(context.module.path)
            # A layer's __call__ may call its parent class's (jdiff's Dense): adapt the outer call only.
            if context.method_name != "__call__" or path not in self._layers or path in active:
                return next_fun(*call_args, **call_kwargs)
            active.add(path)
            try:
                y = next_fun(*call_args, **call_kwargs)
            finally:
                active.discard(path)
            x = call_args[0]
            rows = _rows(self._scales, x.shape[0])
            for index, layer in self._layers[path]:
                y = y + _update(context.module, x, layer, rows[:, index]).astype(y.dtype)
            return y

        with nn.intercept_methods(interceptor):
            return self._module.apply(variables, *args, **kwargs)


def with_adapters(modules: Mapping, adapters: Mapping[str, Mapping], scales) -> dict:
    """`modules` with each adapted component wrapped. adapters: {adapter name: adapter tree};
    scales: [B or 1, n_adapters], a column per adapter in sorted name order (the order a dict has
    after passing through jit, whatever order the adapters were loaded in)."""
    if not adapters:
        return dict(modules)
    wrapped = dict(modules)
    for component in {c for adapter in adapters.values() for c in adapter}:
        layers = {}
        for index, name in enumerate(sorted(adapters)):
            for path, layer in adapters[name].get(component, {}).items():
                layers.setdefault(path, []).append((index, layer))
        wrapped[component] = WithAdapters(modules[component], layers, scales)
    return wrapped


def merged_kernel(kernel: jax.Array, layer, scale: float) -> jax.Array:
    """kernel + scale * alpha/r * (down @ up) in the kernel's layout."""
    down, up = jnp.asarray(layer["down"], jnp.float32), jnp.asarray(layer["up"], jnp.float32)
    delta = jnp.einsum("...ir,ro->...io", down, up) * (scale * layer_scale(layer))
    return (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)


def scale_matrix(names, lora_scales, batch: int):
    """[batch, n_adapters] float32 from generate()'s lora_scales: None (every adapter at 1), one
    {name: scale} dict for the batch, or a list of one dict per image (absent names: 0). Columns in
    sorted name order, as `with_adapters` reads them."""
    names = sorted(names)
    if lora_scales is None:
        return np.ones((batch, len(names)), np.float32)
    rows = [lora_scales] * batch if isinstance(lora_scales, Mapping) else list(lora_scales)
    if len(rows) != batch:
        raise ConfigError(f"lora_scales has {len(rows)} entries for {batch} prompts.")
    matrix = np.zeros((batch, len(names)), np.float32)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ConfigError(f"lora_scales entries must be {{adapter name: scale}} dicts, got {row!r}.")
        unknown = sorted(set(row) - set(names))
        if unknown:
            raise ConfigError(f"lora_scales names {unknown}, which are not loaded; loaded adapters: {names}.")
        for name, value in row.items():
            matrix[i, names.index(name)] = float(value)
    if not np.all(np.isfinite(matrix)):
        raise ConfigError("lora_scales must be finite numbers.")
    return matrix
