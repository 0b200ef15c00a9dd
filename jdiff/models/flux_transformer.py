"""Flux's diffusion transformer, the Flax twin of diffusers' FluxTransformer2DModel (Flux.1 dev and
schnell, and the Fill/Kontext variants of the same shape).

Call: `model.apply({"params": p}, tokens[B, S, in_channels], timestep[B], encoder_hidden_states[B, L,
joint_dim], pooled_projections[B, pooled_dim], img_ids[S, 3], txt_ids[L, 3], guidance[B] or None)`
-> [B, S, out_channels], as diffusers takes them: the latents packed into 2x2 patches (`pack` /
`unpack`), timestep and guidance in [0, 1] (multiplied by 1000 inside), text tokens first in every
joint sequence. Double-stream blocks keep separate weights for text and image tokens (as SD3);
single-stream blocks run one MLP-and-attention block over the concatenation. Positions are rotary
embeddings over three axes (index, row, column) of `ids`.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.errors import ConfigError
from jdiff.models import layers
from jdiff.models.attention import dot_product_attention
from jdiff.models.config import config_to_dict, parse_config
from jdiff.models.dit_layers import (AdaLayerNormContinuous, AdaLayerNormZero, CombinedTimestepTextProjEmbeddings,
                                     GeluFeedForward, modulate, plain_layer_norm)

Dtype = Any
ROPE_THETA = 10000


@dataclasses.dataclass(frozen=True)
class FluxTransformerConfig:
    """The fields of a diffusers `transformer/config.json` for FluxTransformer2DModel."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: Optional[int] = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False  # Flux-dev: the guidance scale is an input (guidance distillation)
    axes_dims_rope: tuple = (16, 56, 56)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "transformer config") -> "FluxTransformerConfig":
        return parse_config(cls, raw, source=source)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    def validate(self, source: str) -> None:
        if self.patch_size != 1:
            raise ConfigError(f"{source}: patch_size {self.patch_size} is not supported; Flux packs 2x2 latent "
                              "patches outside the transformer and sets patch_size 1.")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ConfigError(f"{source}: axes_dims_rope {self.axes_dims_rope} must be even and sum to "
                              f"attention_head_dim {self.attention_head_dim}.")


def example_inputs(config: FluxTransformerConfig) -> tuple:
    guidance = jnp.ones((1,)) if config.guidance_embeds else None
    return (jnp.zeros((1, 1, config.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, config.joint_attention_dim)),
            jnp.zeros((1, config.pooled_projection_dim)), np.zeros((1, 3)), np.zeros((1, 3)), guidance)


# --- packing and positions -----------------------------------------------------------------------


def pack(latents: jax.Array) -> jax.Array:
    """NHWC latents [B, H, W, C] -> tokens [B, H/2 * W/2, 4C], each token a 2x2 patch with its
    features ordered (channel, row, column) as diffusers' `_pack_latents`."""
    b, h, w, c = latents.shape
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """The inverse of `pack`: tokens [B, H/2 * W/2, 4C] -> NHWC latents [B, H, W, C]."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, c)


def image_ids(height: int, width: int) -> np.ndarray:
    """Rotary position ids [H/2 * W/2, 3] of packed latents of H x W: (0, row, column)."""
    ids = np.zeros((height // 2, width // 2, 3), np.float32)
    ids[..., 1] = np.arange(height // 2)[:, None]
    ids[..., 2] = np.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def rope_tables(ids, axes_dims: tuple, theta: float = ROPE_THETA):
    """cos and sin [S, head_dim] of diffusers' FluxPosEmbed: per axis, each position times
    1/theta^(2i/d), every frequency used for two neighbouring features. Host numpy in float64 (as
    diffusers) when the ids are concrete, float32 jnp when traced."""
    xp = np if isinstance(ids, np.ndarray) else jnp
    dtype = np.float64 if xp is np else jnp.float32
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (xp.arange(0, dim, 2, dtype=dtype) / dim)
        angles = xp.asarray(ids[:, axis], dtype)[:, None] * freqs[None, :]
        cos.append(xp.repeat(xp.cos(angles), 2, axis=1))
        sin.append(xp.repeat(xp.sin(angles), 2, axis=1))
    return (xp.concatenate(cos, axis=1).astype(np.float32), xp.concatenate(sin, axis=1).astype(np.float32))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates each (even, odd) feature pair of x [B, S, N, D] by its position's angle, in float32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x.astype(jnp.float32) * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


# --- blocks ----------------------------------------------------------------------------------------


class FluxAttention(nn.Module):
    """diffusers' FluxAttention: q/k/v with biases and RMS-normed queries and keys; with a context,
    its tokens (add_*_proj, norm_added_*) go first in the joint sequence and come back through
    `to_add_out`. `pre_only` (single-stream blocks) has no output projection."""

    heads: int
    dim_head: int
    pre_only: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, rope, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)

        def project(tokens, names, norms):
            q, k, v = (split(layers.dense(inner, name=n, **kw)(tokens)) for n in names)
            return nn.RMSNorm(epsilon=1e-6, name=norms[0], **kw)(q), nn.RMSNorm(epsilon=1e-6, name=norms[1], **kw)(k), v

        q, k, v = project(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        if context is not None:
            cq, ck, cv = project(context, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = dot_product_attention(q, k, v)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        if self.pre_only:
            return out
        n = 0 if context is None else context.shape[1]
        image = layers.dense(x.shape[-1], name="to_out_0", **kw)(out[:, n:])
        if context is None:
            return image
        return image, layers.dense(context.shape[-1], name="to_add_out", **kw)(out[:, :n])


class FluxTransformerBlock(nn.Module):
    """Double-stream block: adaLN-Zero on both streams, joint attention, separate MLPs."""

    config: FluxTransformerConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, context, temb, rope):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normed, (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = AdaLayerNormZero(
            6, name="norm1", **kw)(x, temb)
        normed_c, (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = AdaLayerNormZero(
            6, name="norm1_context", **kw)(context, temb)
        attn, context_attn = FluxAttention(cfg.num_attention_heads, cfg.attention_head_dim, name="attn", **kw)(
            modulate(normed, shift_msa, scale_msa), rope, modulate(normed_c, c_shift_msa, c_scale_msa))
        x = x + gate_msa[:, None] * attn
        h = modulate(plain_layer_norm(1e-6, self.dtype)(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * GeluFeedForward(x.shape[-1], name="ff", **kw)(h)
        context = context + c_gate_msa[:, None] * context_attn
        h = modulate(plain_layer_norm(1e-6, self.dtype)(context), c_shift_mlp, c_scale_mlp)
        context = context + c_gate_mlp[:, None] * GeluFeedForward(context.shape[-1], name="ff_context", **kw)(h)
        return _clip_float16(context), _clip_float16(x)


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over [text; image] tokens: one modulation, attention and a tanh-GELU MLP
    side by side, one output projection of both, gated."""

    config: FluxTransformerConfig
    dtype: Dtype
    param_dtype: Dtype
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x, temb, rope):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = x.shape[-1]
        normed, (shift, scale, gate) = AdaLayerNormZero(3, name="norm", **kw)(x, temb)
        normed = modulate(normed, shift, scale)
        mlp = nn.gelu(layers.dense(int(d * self.mlp_ratio), name="proj_mlp", **kw)(normed), approximate=True)
        attn = FluxAttention(cfg.num_attention_heads, cfg.attention_head_dim, pre_only=True, name="attn", **kw)(
            normed, rope)
        out = layers.dense(d, name="proj_out", **kw)(jnp.concatenate([attn, mlp], axis=-1))
        return _clip_float16(x + gate[:, None] * out)


def _clip_float16(x: jax.Array) -> jax.Array:
    """diffusers clips the residual stream to float16's range in float16 (bfloat16 needs nothing)."""
    return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


class FluxTransformer2DModel(nn.Module):
    config: FluxTransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array,
                 pooled_projections: jax.Array, img_ids, txt_ids, guidance: Optional[jax.Array] = None) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if cfg.guidance_embeds != (guidance is not None):
            raise ValueError("this Flux transformer embeds a guidance scale (dev): pass guidance="
                             if cfg.guidance_embeds else
                             "this Flux transformer has no guidance embedding (schnell): pass guidance=None")
        x = layers.dense(cfg.inner_dim, name="x_embedder", **kw)(tokens)
        pooled = pooled_projections.astype(self.dtype)
        temb = CombinedTimestepTextProjEmbeddings(cfg.inner_dim, name="time_text_embed", **kw)(
            timestep.astype(self.dtype) * 1000, pooled,
            None if guidance is None else guidance.astype(self.dtype) * 1000)
        context = layers.dense(cfg.inner_dim, name="context_embedder", **kw)(encoder_hidden_states)
        ids = (np.concatenate([np.asarray(txt_ids), np.asarray(img_ids)])
               if isinstance(txt_ids, np.ndarray) and isinstance(img_ids, np.ndarray)
               else jnp.concatenate([jnp.asarray(txt_ids), jnp.asarray(img_ids)]))
        rope = tuple(jnp.asarray(t) for t in rope_tables(ids, cfg.axes_dims_rope))

        Double = nn.remat(FluxTransformerBlock) if self.gradient_checkpointing else FluxTransformerBlock
        Single = nn.remat(FluxSingleTransformerBlock) if self.gradient_checkpointing else FluxSingleTransformerBlock
        for i in range(cfg.num_layers):
            context, x = Double(cfg, name=f"transformer_blocks_{i}", **kw)(x, context, temb, rope)
        n = context.shape[1]
        joint = jnp.concatenate([context, x], axis=1)
        for i in range(cfg.num_single_layers):
            joint = Single(cfg, name=f"single_transformer_blocks_{i}", **kw)(joint, temb, rope)
        x = AdaLayerNormContinuous(1e-6, name="norm_out", **kw)(joint[:, n:], temb)
        return layers.dense(cfg.patch_size ** 2 * cfg.output_channels, name="proj_out", **kw)(x)
