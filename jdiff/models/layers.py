"""Building blocks shared by the U-Net and the VAE, named as in diffusers so conversion is a rename.

All modules take NHWC images, `dtype` for computation and `param_dtype` for storage. Normalisation
statistics are computed in float32 whatever the compute dtype, as PyTorch autocast does.
"""

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.errors import ConfigError
from jdiff.models.attention import dot_product_attention

Dtype = Any

ACTIVATIONS: dict[str, Callable] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "relu": nn.relu,
}


def activation(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def group_norm(groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    # Exact two-pass variance: the fast E[x^2]-E[x]^2 form drifts from PyTorch by ~1e-4.
    return nn.GroupNorm(
        num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
        use_fast_variance=False, name=name,
    )


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


class Dense(nn.Dense):
    """nn.Dense applied to a 2-D view of its input. On [B, T, C] inputs the kernel's gradient is a dot
    contracting two dimensions (B and T), which XLA:CPU runs about 3x slower than one 2-D matrix
    product (measured: 18 vs 5 ms forward+backward at 32 x 256 x 32 -> 256)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.features)


class PointwiseConv(nn.Module):
    """A 1x1 convolution as a matrix product over the flattened pixels (the same [1, 1, in, out]
    kernel as nn.Conv, so checkpoints do not change); XLA:CPU's 1x1 convolution gradient is slower."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = x.reshape(-1, x.shape[-1]) @ kernel[0, 0] + bias
        return y.reshape(*x.shape[:-1], self.features)


def conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, stride: int = 1,
         padding: Optional[int] = None) -> nn.Module:
    pad = (kernel - 1) // 2 if padding is None else padding
    if kernel == 1 and stride == 1 and pad == 0:
        return PointwiseConv(features, dtype=dtype, param_dtype=param_dtype, name=name)
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        dtype=dtype, param_dtype=param_dtype, name=name,
    )


def dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str, use_bias: bool = True) -> Dense:
    return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding; `cond_proj` adds a guidance-scale embedding (LCM)."""

    features: int
    act_fn: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, emb: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if cond is not None:
            emb = emb + dense(emb.shape[-1], name="cond_proj", use_bias=False, **kw)(cond)
        emb = dense(self.features, name="linear_1", **kw)(emb)
        return dense(self.features, name="linear_2", **kw)(activation(self.act_fn)(emb))


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice, with an optional time embedding added (or scale-shifted) between."""

    out_channels: int
    groups: int
    eps: float
    act_fn: str = "silu"
    time_embedding_norm: str = "default"  # or "scale_shift"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        act = activation(self.act_fn)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = act(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        scale_shift = None
        if temb is not None:
            width = self.out_channels * (2 if self.time_embedding_norm == "scale_shift" else 1)
            t = dense(width, name="time_emb_proj", **kw)(act(temb))[:, None, None, :]
            if self.time_embedding_norm == "scale_shift":
                scale_shift = jnp.split(t, 2, axis=-1)
            else:
                h = h + t
        h = group_norm(self.groups, self.eps, name="norm2", **kw)(h)
        if scale_shift is not None:
            scale, shift = scale_shift
            h = h * (1 + scale) + shift
        h = conv(self.out_channels, 3, name="conv2", **kw)(act(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Attention(nn.Module):
    """Multi-head attention with diffusers' projection names (to_q, to_k, to_v, to_out.0).

    Runs through `jdiff.models.attention.dot_product_attention` (the fused kernel each backend
    has). `upcast` computes the attention in float32 (SD2's `upcast_attention`).
    """

    heads: int
    dim_head: int
    out_features: int
    qkv_bias: bool = False
    upcast: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        context = x if context is None else context
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
        q = split(dense(inner, name="to_q", use_bias=self.qkv_bias, **kw)(x))
        k = split(dense(inner, name="to_k", use_bias=self.qkv_bias, **kw)(context))
        v = split(dense(inner, name="to_v", use_bias=self.qkv_bias, **kw)(context))
        compute_dtype = jnp.float32 if self.upcast else q.dtype
        out = dot_product_attention(
            q.astype(compute_dtype), k.astype(compute_dtype), v.astype(compute_dtype)
        ).astype(q.dtype)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        return dense(self.out_features, name="to_out_0", **kw)(out)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; padding 0 means diffusers' asymmetric (right/bottom) pad, as in the VAE."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2,
                    padding=self.padding)(x)


def upsample_nearest(x: jax.Array, size: Optional[tuple[int, int]] = None) -> jax.Array:
    """Nearest-neighbour resize as torch's `F.interpolate(mode="nearest")`: 2x, or to `size`."""
    _, h, w, _ = x.shape
    out_h, out_w = size or (2 * h, 2 * w)
    if (out_h, out_w) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(out_h) * h) // out_h
    cols = (jnp.arange(out_w) * w) // out_w
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: Optional[tuple[int, int]] = None) -> jax.Array:
        x = upsample_nearest(x, size)
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv")(x)
