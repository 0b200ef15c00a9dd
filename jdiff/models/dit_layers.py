"""Building blocks of the diffusion transformers (SD3's MMDiT, Flux), named as in diffusers.

Adaptive layer norms modulate a parameter-free LayerNorm with shifts, scales and gates computed from
the conditioning vector (timestep plus pooled text); the feed-forward is a tanh-GELU MLP. Statistics
are computed in float32 whatever the compute dtype.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models import layers

Dtype = Any


def plain_layer_norm(eps: float, dtype: Dtype, name: str = None) -> nn.LayerNorm:
    """LayerNorm without scale or bias (`elementwise_affine=False`)."""
    return nn.LayerNorm(epsilon=eps, use_scale=False, use_bias=False, use_fast_variance=False, dtype=dtype, name=name)


class AdaLayerNormZero(nn.Module):
    """diffusers' AdaLayerNormZero (chunks=6) and SD35AdaLayerNormZeroX (chunks=9): `linear(silu(emb))`
    split into `chunks` vectors [B, D]; returns the first shift/scale applied to LayerNorm(x) and
    every chunk (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2,
    scale_msa2, gate_msa2])."""

    chunks: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array):
        d = x.shape[-1]
        mods = jnp.split(layers.dense(self.chunks * d, self.dtype, self.param_dtype, "linear")(nn.silu(emb)),
                         self.chunks, axis=-1)
        normed = plain_layer_norm(1e-6, self.dtype)(x)
        return normed, mods


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x * (1 + scale) + shift, with [B, D] modulations broadcast over the tokens of x [B, T, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormContinuous(nn.Module):
    """diffusers' AdaLayerNormContinuous with `elementwise_affine=False`: note its chunks are
    (scale, shift), the reverse of AdaLayerNormZero's."""

    eps: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        scale, shift = jnp.split(
            layers.dense(2 * x.shape[-1], self.dtype, self.param_dtype, "linear")(nn.silu(emb).astype(self.dtype)),
            2, axis=-1)
        return modulate(plain_layer_norm(self.eps, self.dtype)(x), shift, scale)


class GeluFeedForward(nn.Module):
    """diffusers' FeedForward with `activation_fn="gelu-approximate"`: `net.0.proj`, tanh GELU,
    `net.2`; inner width 4x."""

    out_features: int
    dtype: Dtype
    param_dtype: Dtype
    mult: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _GeluProj(self.mult * x.shape[-1], name="net_0", **kw)(x)
        return layers.dense(self.out_features, name="net_2", **kw)(h)


class _GeluProj(nn.Module):
    """diffusers' GELU module: a projection (`proj`) then the activation."""

    features: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.gelu(layers.dense(self.features, self.dtype, self.param_dtype, "proj")(x), approximate=True)


class TextProjection(nn.Module):
    """diffusers' PixArtAlphaTextProjection: linear_1, activation, linear_2 (the pooled text)."""

    features: int
    act_fn: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.act_fn == "gelu_tanh":
            act = functools.partial(nn.gelu, approximate=True)
        else:
            act = layers.activation(self.act_fn)
        h = act(layers.dense(self.features, name="linear_1", **kw)(x))
        return layers.dense(self.features, name="linear_2", **kw)(h)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """The conditioning vector: an MLP of the sinusoidal timestep (plus, for guidance-distilled
    models such as Flux-dev, an MLP of the sinusoidal guidance scale) plus an MLP of the pooled text.
    diffusers' CombinedTimestepTextProjEmbeddings and CombinedTimestepGuidanceTextProjEmbeddings."""

    features: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array, guidance: jax.Array = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        sinusoid = lambda t: layers.timestep_embedding(t, 256, flip_sin_to_cos=True, freq_shift=0).astype(pooled.dtype)
        emb = layers.TimestepEmbedding(self.features, "silu", name="timestep_embedder", **kw)(sinusoid(timestep))
        if guidance is not None:
            emb = emb + layers.TimestepEmbedding(self.features, "silu", name="guidance_embedder", **kw)(
                sinusoid(guidance))
        return emb + TextProjection(self.features, "silu", name="text_embedder", **kw)(pooled)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """diffusers' get_1d_sincos_pos_embed_from_grid: [sin | cos] of positions times 1/10000^(2i/dim),
    in float64."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """diffusers' get_2d_sincos_pos_embed for a square grid: [grid*grid, dim] float32, row-major
    over (row, column); the first half of the channels encodes the column, the second the row."""
    coords = np.arange(grid_size, dtype=np.float32) / np.float32(grid_size / base_size) / np.float32(
        interpolation_scale)
    columns, rows = np.meshgrid(coords, coords, indexing="xy")
    return np.concatenate([sincos_1d(dim // 2, columns), sincos_1d(dim // 2, rows)], axis=1).astype(np.float32)
