"""SD3's diffusion transformer (MMDiT), the Flax twin of diffusers' SD3Transformer2DModel, for SD3
and SD3.5 (query/key RMS norms; SD3.5 Medium's extra image self-attention in `dual_attention_layers`).

Call: `model.apply({"params": p}, x[B, H, W, C], timestep[B], encoder_hidden_states[B, L, joint_dim],
pooled_projections[B, pooled_dim])` -> [B, H, W, out_channels], NHWC like the rest of jdiff. The
latents are cut into patch_size^2 patches (tokens) with fixed sin-cos positions cropped from the
centre of a pos_embed_max_size^2 grid; image and text tokens keep separate weights but attend
jointly; every block is modulated (adaLN-Zero) by the timestep and the pooled text. The timestep is
the flow-matching one (sigma * 1000).
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.errors import ConfigError
from jdiff.models import layers
from jdiff.models.attention import dot_product_attention
from jdiff.models.config import config_to_dict, parse_config
from jdiff.models.dit_layers import (AdaLayerNormContinuous, AdaLayerNormZero, CombinedTimestepTextProjEmbeddings,
                                     GeluFeedForward, modulate, plain_layer_norm, sincos_2d)

Dtype = Any
QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class SD3TransformerConfig:
    """The fields of a diffusers `transformer/config.json` for SD3Transformer2DModel, with diffusers'
    defaults."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: Optional[int] = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple = ()
    qk_norm: Optional[str] = None

    @classmethod
    def from_dict(cls, raw: dict, source: str = "transformer config") -> "SD3TransformerConfig":
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
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"{source}: qk_norm {self.qk_norm!r} is not supported; SD3 and SD3.5 use "
                              f"{' or '.join(map(repr, QK_NORMS))}.")
        if self.caption_projection_dim != self.inner_dim:
            raise ConfigError(f"{source}: caption_projection_dim {self.caption_projection_dim} must equal "
                              f"num_attention_heads x attention_head_dim = {self.inner_dim} (the text tokens "
                              "join the image tokens' attention).")
        if not self.pos_embed_max_size:
            raise ConfigError(f"{source}: pos_embed_max_size must be set (every SD3 checkpoint sets it).")
        if any(not 0 <= i < self.num_layers for i in self.dual_attention_layers):
            raise ConfigError(f"{source}: dual_attention_layers {self.dual_attention_layers} name blocks "
                              f"outside 0..{self.num_layers - 1}.")

    def position_embedding(self):
        """The sin-cos table diffusers stores as the `pos_embed.pos_embed` buffer: [1, max^2, D]."""
        table = sincos_2d(self.inner_dim, self.pos_embed_max_size, self.sample_size // self.patch_size)
        return table[None]


def example_inputs(config: SD3TransformerConfig) -> tuple:
    p = config.patch_size
    return (jnp.zeros((1, p, p, config.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, 1, config.joint_attention_dim)), jnp.zeros((1, config.pooled_projection_dim)))


class JointAttention(nn.Module):
    """diffusers' Attention with JointAttnProcessor2_0: image tokens through to_q/k/v, text tokens
    through add_q/k/v_proj, one softmax over both; `context_pre_only` (the last block) drops the text
    output projection. Without a context it is the plain self-attention of SD3.5's `attn2`."""

    heads: int
    dim_head: int
    qk_norm: Optional[str]
    context_pre_only: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
        norm = lambda name: (nn.RMSNorm(epsilon=1e-6, name=name, **kw) if self.qk_norm else (lambda t: t))

        def project(tokens, q_name, k_name, v_name, suffix):
            q, k, v = (split(layers.dense(inner, name=n, **kw)(tokens)) for n in (q_name, k_name, v_name))
            return norm(f"norm_{suffix}q")(q), norm(f"norm_{suffix}k")(k), v

        q, k, v = project(x, "to_q", "to_k", "to_v", "")
        if context is not None:
            cq, ck, cv = project(context, "add_q_proj", "add_k_proj", "add_v_proj", "added_")
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
        out = dot_product_attention(q, k, v)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        n = x.shape[1]
        image = layers.dense(x.shape[-1], name="to_out_0", **kw)(out[:, :n])
        if context is None or self.context_pre_only:
            return image, None
        return image, layers.dense(context.shape[-1], name="to_add_out", **kw)(out[:, n:])


class JointTransformerBlock(nn.Module):
    """diffusers' JointTransformerBlock: returns (context, x); the context is None after the last
    block (`context_pre_only`), whose text stream only feeds the attention."""

    config: SD3TransformerConfig
    context_pre_only: bool
    dual_attention: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = dict(heads=cfg.num_attention_heads, dim_head=cfg.attention_head_dim, qk_norm=cfg.qk_norm, **kw)
        normed, mods = AdaLayerNormZero(9 if self.dual_attention else 6, name="norm1", **kw)(x, temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        if self.context_pre_only:
            context_in = AdaLayerNormContinuous(1e-6, name="norm1_context", **kw)(context, temb)
        else:
            normed_context, cmods = AdaLayerNormZero(6, name="norm1_context", **kw)(context, temb)
            context_in = modulate(normed_context, cmods[0], cmods[1])

        attn, context_attn = JointAttention(context_pre_only=self.context_pre_only, name="attn", **attention)(
            modulate(normed, shift_msa, scale_msa), context_in)
        x = x + gate_msa[:, None] * attn
        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            attn2, _ = JointAttention(name="attn2", **attention)(modulate(normed, shift_msa2, scale_msa2))
            x = x + gate_msa2[:, None] * attn2
        h = modulate(plain_layer_norm(1e-6, self.dtype)(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * GeluFeedForward(x.shape[-1], name="ff", **kw)(h)
        if self.context_pre_only:
            return None, x

        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmods
        context = context + c_gate_msa[:, None] * context_attn
        h = modulate(plain_layer_norm(1e-6, self.dtype)(context), c_shift_mlp, c_scale_mlp)
        context = context + c_gate_mlp[:, None] * GeluFeedForward(context.shape[-1], name="ff_context", **kw)(h)
        return context, x


class PatchEmbed(nn.Module):
    """diffusers' PatchEmbed as SD3 uses it: a patch_size-strided convolution (`proj`) to tokens,
    plus the sin-cos positions of the centre crop of the pos_embed_max_size^2 table that fits."""

    config: SD3TransformerConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, p, grid = self.config, self.config.patch_size, self.config.pos_embed_max_size
        b, height, width, _ = x.shape
        h, w = height // p, width // p
        tokens = nn.Conv(cfg.inner_dim, (p, p), strides=(p, p), padding="VALID", name="proj", dtype=self.dtype,
                         param_dtype=self.param_dtype)(x).reshape(b, h * w, cfg.inner_dim)
        table = cfg.position_embedding().reshape(grid, grid, -1)
        top, left = (grid - h) // 2, (grid - w) // 2
        return tokens + jnp.asarray(table[top:top + h, left:left + w].reshape(1, h * w, -1), tokens.dtype)


class SD3Transformer2DModel(nn.Module):
    config: SD3TransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array,
                 pooled_projections: jax.Array, skip_layers: tuple = ()) -> jax.Array:
        """skip_layers: blocks to leave out (SD3.5's skip-layer guidance); static."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, _ = x.shape
        p, grid = cfg.patch_size, cfg.pos_embed_max_size
        h, w = height // p, width // p
        if height % p or width % p:
            raise ValueError(f"latents of {height}x{width} do not split into {p}x{p} patches.")
        if h > grid or w > grid:
            raise ValueError(f"latents of {height}x{width} make a {h}x{w} patch grid; this transformer's position "
                             f"table is {grid}x{grid} (pos_embed_max_size).")

        x = PatchEmbed(cfg, name="pos_embed", **kw)(x)
        temb = CombinedTimestepTextProjEmbeddings(cfg.inner_dim, name="time_text_embed", **kw)(
            timestep, pooled_projections.astype(self.dtype))
        context = layers.dense(cfg.caption_projection_dim, name="context_embedder", **kw)(encoder_hidden_states)

        Block = nn.remat(JointTransformerBlock) if self.gradient_checkpointing else JointTransformerBlock
        for i in range(cfg.num_layers):
            if i in skip_layers:
                continue
            context, x = Block(cfg, context_pre_only=i == cfg.num_layers - 1,
                               dual_attention=i in cfg.dual_attention_layers, name=f"transformer_blocks_{i}",
                               **kw)(x, context, temb)

        x = AdaLayerNormContinuous(1e-6, name="norm_out", **kw)(x, temb)
        x = layers.dense(p * p * cfg.output_channels, name="proj_out", **kw)(x)
        x = x.reshape(b, h, w, p, p, cfg.output_channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, height, width, cfg.output_channels)
