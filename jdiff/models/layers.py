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


# Query rows per block of the CPU attention: keeps one block of scores (rows x keys) near 16 MB.
_CPU_SCORE_ELEMENTS = 1 << 22


def _query_blocks(x: jax.Array, rows: int) -> jax.Array:
    """[T, ...] -> [blocks, rows, ...], the last block padded with zeros."""
    blocks = -(-x.shape[0] // rows)
    padding = [(0, blocks * rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, padding).reshape(blocks, rows, *x.shape[1:])


def _rows_per_block(q: jax.Array, k: jax.Array) -> int:
    return max(1, min(q.shape[0], _CPU_SCORE_ELEMENTS // k.shape[0]))


def _attention_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax attention for one head, [T,H] x [S,H] -> [T,H], one block of queries at a time so its
    scores stay in cache; also returns each query's log-sum-exp of scores, for the backward pass."""
    t = q.shape[0]

    def block(qb):
        scores = qb @ k.T
        peak = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - peak)
        total = jnp.sum(p, axis=-1, keepdims=True)
        return (p @ v) / total.astype(v.dtype), (peak + jnp.log(total))[:, 0].astype(jnp.float32)

    out, lse = jax.lax.map(block, _query_blocks(q * (q.shape[-1] ** -0.5), _rows_per_block(q, k)))
    return out.reshape(-1, v.shape[-1])[:t], lse.reshape(-1)[:t]


@jax.custom_vjp
def _attention_one_head(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return _attention_forward(q, k, v)[0]


def _attention_one_head_fwd(q, k, v):
    out, lse = _attention_forward(q, k, v)
    return out, (q, k, v, out, lse)


def _attention_one_head_bwd(residuals, d_out):
    """Flash attention's backward pass: each block's probabilities are recomputed from the saved
    log-sum-exp, so no T x S array is kept between the passes and no max or sum is differentiated."""
    q, k, v, out, lse = residuals
    t, scale = q.shape[0], q.shape[-1] ** -0.5
    rows = _rows_per_block(q, k)
    # rowsum(dO * O): the softmax Jacobian's correction term, per query.
    correction = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    blocks = tuple(_query_blocks(x, rows) for x in (q * scale, d_out, lse, correction))

    def block(carry, xs):
        dk, dv = carry
        qb, d_ob, lse_b, correction_b = xs
        p = jnp.exp(qb @ k.T - lse_b[:, None].astype(qb.dtype))
        dv = dv + (p.T @ d_ob).astype(jnp.float32)
        d_scores = p * (d_ob @ v.T - correction_b[:, None].astype(p.dtype))
        dk = dk + (d_scores.T @ qb).astype(jnp.float32)
        return (dk, dv), d_scores @ k

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(block, zeros, blocks)
    dq = dq.reshape(-1, q.shape[-1])[:t] * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention_one_head.defvjp(_attention_one_head_fwd, _attention_one_head_bwd)


_SMALL_SCORES = 1 << 16  # query x key positions per head below which all heads run at once
# The blocked CPU path loops over batch x heads, which an SPMD partitioner cannot split over devices
# (it gathers the batch instead). False: jax.nn.dot_product_attention on CPU too, as on GPU and TPU
# (bench/scale.py compiles the program an accelerator would run).
CPU_BLOCKED_ATTENTION = True


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention on [B,T,N,H] tensors.

    On GPU and TPU this is `jax.nn.dot_product_attention` (cuDNN flash attention, fused TPU kernels).
    On CPU, XLA materialises all heads' scores at once (8 x 4096 x 4096 floats per image for SD1.5's
    first level) and runs 5x slower than PyTorch; one head and one block of queries at a time keeps
    the scores in cache and beats PyTorch's flash kernel (measured in bench/models.py).
    """
    b, t, n, h = q.shape
    # Short sequences (small latents, text): every head's scores fit in cache together, and a
    # sequential loop over batch x heads would cost far more than it saves.
    if jax.default_backend() != "cpu" or not CPU_BLOCKED_ATTENTION or t * k.shape[1] <= _SMALL_SCORES:
        return jax.nn.dot_product_attention(q, k, v)
    heads = lambda x: x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], h)
    out = jax.lax.map(lambda qkv: _attention_one_head(*qkv), (heads(q), heads(k), heads(v)))
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """Multi-head attention with diffusers' projection names (to_q, to_k, to_v, to_out.0).

    Runs through `dot_product_attention` below. `upcast` computes the attention in float32 (SD2's `upcast_attention`).
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
