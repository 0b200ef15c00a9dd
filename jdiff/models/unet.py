"""Text-conditioned U-Net (Stable Diffusion 1.x / 2.x / XL), the Flax twin of diffusers' UNet2DConditionModel.

Call: `unet.apply({"params": p}, x[B,H,W,C], t[B], context[B,L,D])` -> prediction [B,H,W,C_out].
SDXL (addition_embed_type="text_time") also takes
`added_cond={"text_embeds": pooled[B,P], "time_ids": ids[B,K]}`, diffusers' `added_cond_kwargs`.
A ControlNet's outputs enter through `down_block_additional_residuals` (one per skip) and
`mid_block_additional_residual`.
"""

import dataclasses
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.errors import ConfigError
from jdiff.models import layers
from jdiff.models.config import config_to_dict, parse_config, per_block

Dtype = Any
IntOrTuple = Union[int, tuple]

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)

# diffusers UNet2DConditionModel arguments that jdiff does not implement, with the value accepted.
_UNSUPPORTED = {
    "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_act_fn": None,
    "timestep_post_act": None, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
    "dropout": 0.0,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architectural fields of a diffusers `unet/config.json`, with diffusers' defaults."""

    sample_size: Optional[int] = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: Union[bool, tuple] = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: Optional[int] = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    # Transformer depth: one int, one per block, or (nested) one per attention of each block.
    transformer_layers_per_block: IntOrTuple = 1
    # The up blocks' depths, one entry per up block (int or one per attention); None: the down
    # blocks' per-block values reversed. Needed when transformer_layers_per_block is nested.
    reverse_transformer_layers_per_block: Optional[tuple] = None
    # Legacy diffusers naming: with num_attention_heads unset, attention_head_dim is the head *count*.
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: Optional[int] = None
    time_cond_proj_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    mid_block_only_cross_attention: Optional[bool] = None
    # "text": an attention-pooled summary of the text is added to the time embedding, so every
    # ResNet sees the prompt (diffusers' TextTimeEmbedding, as in DeepFloyd IF).
    # "text_time" (SDXL): the pooled text embedding and sinusoidal embeddings of the micro-
    # conditioning ids (sizes, crop, aesthetic score) go through `add_embedding`, added likewise.
    addition_embed_type: Optional[str] = None
    addition_embed_type_num_heads: int = 64
    addition_time_embed_dim: Optional[int] = None  # sinusoid width of each time id ("text_time")
    projection_class_embeddings_input_dim: Optional[int] = None  # P + K * addition_time_embed_dim

    @classmethod
    def from_dict(cls, raw: dict, source: str = "unet config") -> "UNetConfig":
        return parse_config(cls, raw, source=source, unsupported_defaults=_UNSUPPORTED)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    # Per-block views, as diffusers expands them.
    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    def per_block(self, name: str) -> tuple:
        return per_block(getattr(self, name), self.num_blocks, name)

    @property
    def heads(self) -> tuple:
        return per_block(self.num_attention_heads or self.attention_head_dim, self.num_blocks, "heads")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def _attentions(self, index: int, up: bool) -> int:
        return self.per_block("layers_per_block")[index] + (1 if up else 0)

    def transformer_depths(self, index: int, up: bool = False) -> tuple:
        """Transformer layers of each attention in down block `index` (or in the up block at the
        same level, `index` counting down-path blocks), as diffusers expands them."""
        if up and self.reverse_transformer_layers_per_block is not None:
            entry = self.reverse_transformer_layers_per_block[self.num_blocks - 1 - index]
        else:
            entry = self.per_block("transformer_layers_per_block")[index]
        n = self._attentions(index, up)
        # diffusers reads the first n entries of a per-attention list (the mid block reads one).
        return entry[:n] if isinstance(entry, tuple) else (entry,) * n

    @property
    def mid_transformer_depth(self) -> int:
        entry = self.per_block("transformer_layers_per_block")[-1]
        return entry[0] if isinstance(entry, tuple) else entry

    def _validate_depths(self, source: str, up_blocks: bool) -> None:
        n = self.num_blocks
        down = per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block", source)
        reverse = self.reverse_transformer_layers_per_block
        if not up_blocks:
            reverse = None
        elif reverse is None and any(isinstance(d, tuple) for d in down):
            raise ConfigError(f"{source}: a nested transformer_layers_per_block (one depth per attention) needs "
                              "reverse_transformer_layers_per_block for the up blocks, as in diffusers.")
        if reverse is not None and (not isinstance(reverse, tuple) or len(reverse) != n):
            raise ConfigError(f"{source}: reverse_transformer_layers_per_block needs one entry per up block "
                              f"({n}), got {reverse!r}.")
        paths = [(False, self.down_block_types, down)]
        if up_blocks:
            paths.append((True, self.up_block_types[::-1], reverse[::-1] if reverse else down))
        for up, types, entries in paths:
            for i, (kind, entry) in enumerate(zip(types, entries)):
                needed = self._attentions(i, up)
                if kind.startswith("CrossAttn") and isinstance(entry, tuple) and len(entry) < needed:
                    field = "reverse_transformer_layers_per_block" if up and reverse else "transformer_layers_per_block"
                    raise ConfigError(f"{source}: {field} gives {len(entry)} depths for {kind} at level {i}, "
                                      f"which has {needed} attentions.")

    def _validate_text_time(self, source: str) -> None:
        for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if not getattr(self, name):
                raise ConfigError(f"{source}: addition_embed_type 'text_time' needs {name}.")
        if self.projection_class_embeddings_input_dim <= self.addition_time_embed_dim:
            raise ConfigError(f"{source}: projection_class_embeddings_input_dim "
                              f"{self.projection_class_embeddings_input_dim} leaves no room for the text embeddings "
                              f"next to time ids of width addition_time_embed_dim {self.addition_time_embed_dim}.")

    def validate(self, source: str, up_blocks: bool = True) -> None:
        """up_blocks=False checks only what the input embeddings, the down blocks and the mid block
        read: a ControlNet's encoder (see controlnet.ControlNetConfig), which has no up path."""
        n = self.num_blocks
        if len(self.down_block_types) != n or (up_blocks and len(self.up_block_types) != n):
            raise ConfigError(f"{source}: {len(self.down_block_types)} down and {len(self.up_block_types)} "
                              f"up block types for {n} block_out_channels.")
        kinds = ((self.down_block_types, DOWN_BLOCKS), (self.up_block_types if up_blocks else (), UP_BLOCKS),
                 ((self.mid_block_type,), MID_BLOCKS))
        for kind, allowed in kinds:
            for name in kind:
                if name not in allowed:
                    raise ConfigError(f"{source}: block type {name!r} is not supported; use one of {allowed}.")
        for name in ("layers_per_block", "cross_attention_dim", "only_cross_attention"):
            per_block(getattr(self, name), n, name, source)
        self._validate_depths(source, up_blocks)
        heads = per_block(self.num_attention_heads or self.attention_head_dim, n, "attention heads", source)
        groups = self.norm_num_groups
        for channels, h in zip(self.block_out_channels, heads):
            if channels % h:
                raise ConfigError(f"{source}: {channels} channels do not split into {h} attention heads.")
            if groups and channels % groups:
                raise ConfigError(f"{source}: {channels} channels do not split into {groups} norm groups.")
        if self.addition_embed_type not in (None, "text", "text_time"):
            raise ConfigError(f"{source}: addition_embed_type {self.addition_embed_type!r} is not supported; "
                              "use None, 'text' or 'text_time'.")
        if self.addition_embed_type == "text_time":
            self._validate_text_time(source)
        text = self.addition_embed_type == "text"
        if text and not isinstance(self.cross_attention_dim, int):
            raise ConfigError(f"{source}: addition_embed_type 'text' needs one cross_attention_dim.")
        if text and self.cross_attention_dim % self.addition_embed_type_num_heads:
            raise ConfigError(f"{source}: cross_attention_dim {self.cross_attention_dim} does not split into "
                              f"addition_embed_type_num_heads = {self.addition_embed_type_num_heads}.")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ConfigError(f"{source}: resnet_time_scale_shift {self.resnet_time_scale_shift!r} is not "
                              "supported; use 'default' or 'scale_shift'.")
        layers.activation(self.act_fn)


def text_embeds_width(config: UNetConfig, num_time_ids: int) -> int:
    """The width P of `text_embeds` that a "text_time" U-Net takes beside `num_time_ids` (K) ids.

    The checkpoint fixes only P + K * addition_time_embed_dim (projection_class_embeddings_input_dim);
    the split is the pipeline's: SDXL base passes 6 ids (original size, crop corner, target size),
    the refiner 5 (original size, crop corner, aesthetic score), both with P = 1280 (the second
    text encoder's projection_dim).
    """
    p = config.projection_class_embeddings_input_dim - num_time_ids * config.addition_time_embed_dim
    if p <= 0:
        raise ValueError(f"{num_time_ids} time ids of width addition_time_embed_dim {config.addition_time_embed_dim} "
                         f"leave no room in projection_class_embeddings_input_dim "
                         f"{config.projection_class_embeddings_input_dim} for the text embeddings.")
    return p


def example_inputs(config: UNetConfig, num_time_ids: int = 1) -> tuple:
    """Smallest inputs that reach every parameter (for `init` under `jax.eval_shape`).

    A "text_time" U-Net's parameters depend only on P + K * addition_time_embed_dim, so any split
    reaches them all; the default, one time id, fits every valid config. Pass SDXL's 6 (base) or 5
    (refiner) for inputs shaped like that pipeline's.
    """
    size = 2 ** (config.num_blocks - 1)
    cross = config.per_block("cross_attention_dim")[0]
    args = (jnp.zeros((1, size, size, config.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, cross)),
            jnp.zeros((1, config.time_cond_proj_dim)) if config.time_cond_proj_dim else None)
    if config.addition_embed_type == "text_time":
        p = text_embeds_width(config, num_time_ids)
        return args + ({"text_embeds": jnp.zeros((1, p)), "time_ids": jnp.zeros((1, num_time_ids))},)
    return args if args[-1] is not None else args[:-1]


# The architectural fields of the released SDXL `unet/config.json` files (the rest are diffusers'
# defaults), as data: `UNetConfig.from_dict(SDXL_BASE)`, or diffusers' `UNet2DConditionModel(**SDXL_BASE)`.
SDXL_BASE = dict(  # stabilityai/stable-diffusion-xl-base-1.0: 2.57B parameters
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 time ids x 256
)
SDXL_REFINER = dict(  # stabilityai/stable-diffusion-xl-refiner-1.0: 2.26B parameters
    sample_size=128, block_out_channels=(384, 768, 1536, 1536), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,  # 1280 pooled text + 5 time ids x 256
)


def text_time_input(config: UNetConfig, added_cond: Optional[dict]) -> jax.Array:
    """SDXL's micro-conditioning ("text_time"): the pooled text [B, P], then the sinusoidal embedding
    of each time id, flattened to [B, P + K * addition_time_embed_dim] for `add_embedding`."""
    missing = [k for k in ("text_embeds", "time_ids") if added_cond is None or k not in added_cond]
    if missing:
        raise ValueError("this U-Net has addition_embed_type 'text_time' (SDXL): pass added_cond="
                         f"{{'text_embeds': [B, P], 'time_ids': [B, K]}}; missing {', '.join(missing)}.")
    text, ids = jnp.asarray(added_cond["text_embeds"]), jnp.asarray(added_cond["time_ids"])
    if text.ndim != 2 or ids.ndim != 2:
        raise ValueError(f"added_cond: text_embeds must be [B, P] and time_ids [B, K]; got shapes "
                         f"{text.shape} and {ids.shape}.")
    width = text.shape[1] + ids.shape[1] * config.addition_time_embed_dim
    if width != config.projection_class_embeddings_input_dim:
        raise ValueError(
            f"added_cond: text_embeds width {text.shape[1]} + {ids.shape[1]} time_ids x addition_time_embed_dim "
            f"{config.addition_time_embed_dim} = {width}, but projection_class_embeddings_input_dim is "
            f"{config.projection_class_embeddings_input_dim}.")
    batch, k = ids.shape
    ids = layers.timestep_embedding(ids.reshape(-1), config.addition_time_embed_dim, config.flip_sin_to_cos,
                                    config.freq_shift).reshape(batch, k * config.addition_time_embed_dim)
    return jnp.concatenate([text.astype(jnp.float32), ids], axis=-1)


def time_conditioning(config: UNetConfig, batch: int, timesteps: jax.Array, context: jax.Array,
                      timestep_cond: Optional[jax.Array], added_cond: Optional[dict], dtype: Dtype,
                      param_dtype: Dtype) -> jax.Array:
    """The embedding every ResNet receives [B, time_embed_dim]: the timestep's MLP embedding plus the
    configured addition embedding. Called from a parent's compact method (the U-Net's, a ControlNet's):
    its layers, `time_embedding` and `add_embedding`, become the parent's, named as in diffusers."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    c0 = config.block_out_channels[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    temb = layers.timestep_embedding(timesteps, c0, config.flip_sin_to_cos, config.freq_shift).astype(dtype)
    time_embedding = layers.TimestepEmbedding(config.time_embed_dim, config.act_fn, name="time_embedding", **kw)
    temb = time_embedding(temb, timestep_cond)
    if config.addition_embed_type == "text":
        temb = temb + TextTimeEmbedding(config.time_embed_dim, config.addition_embed_type_num_heads,
                                        name="add_embedding", **kw)(context.astype(dtype))
    elif config.addition_embed_type == "text_time":
        # diffusers builds add_embedding with its default SiLU, whatever the config's act_fn.
        temb = temb + layers.TimestepEmbedding(config.time_embed_dim, "silu", name="add_embedding", **kw)(
            text_time_input(config, added_cond).astype(dtype))
    return temb


class AttentionPooling(nn.Module):
    """[B, L, W] -> [B, W]: one query (the mean token plus a learned offset) attends over itself
    and the tokens."""

    heads: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, _, width = x.shape
        offset = self.param("positional_embedding", nn.initializers.normal(width ** -0.5), (1, width),
                            self.param_dtype)
        query_token = x.mean(axis=1, keepdims=True) + offset.astype(x.dtype)
        x = jnp.concatenate([query_token, x], axis=1)
        split = lambda t: t.reshape(batch, t.shape[1], self.heads, width // self.heads)  # noqa: E731
        q = split(layers.dense(width, name="q_proj", **kw)(query_token))
        k, v = (split(layers.dense(width, name=f"{n}_proj", **kw)(x)) for n in ("k", "v"))
        scale = (width // self.heads) ** -0.25  # on both sides, as the reference does
        weights = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k * scale)
        weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, width)


class TextTimeEmbedding(nn.Module):
    """The pooled text as a time-embedding offset (diffusers' addition_embed_type="text")."""

    features: int
    heads: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.layer_norm(1e-5, name="norm1", **kw)(context)
        x = AttentionPooling(self.heads, name="pool", **kw)(x)
        x = layers.dense(self.features, name="proj", **kw)(x)
        return layers.layer_norm(1e-5, name="norm2", **kw)(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-LayerNorm residuals."""

    heads: int
    dim_head: int
    only_cross_attention: bool
    upcast: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        attn = lambda name: layers.Attention(self.heads, self.dim_head, dim, upcast=self.upcast, name=name, **kw)
        norm = lambda name: layers.layer_norm(1e-5, name=name, **kw)
        x = x + attn("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
        x = x + attn("attn2")(norm("norm2")(x), context)
        return x + FeedForward(4 * dim, name="ff", **kw)(norm("norm3")(x))


class GEGLU(nn.Module):
    """Gated GELU: one matmul (`proj`) makes both the value and the gate."""

    inner: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(layers.dense(2 * self.inner, self.dtype, self.param_dtype, "proj")(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' FeedForward: `net.0` is the GEGLU, `net.1` a dropout, `net.2` the output projection."""

    inner: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.inner, self.dtype, self.param_dtype, name="net_0")(x)
        return layers.dense(x.shape[-1], self.dtype, self.param_dtype, "net_2")(h)


class Transformer2D(nn.Module):
    """GroupNorm, project in, transformer blocks over the H*W tokens, project out, residual."""

    heads: int
    depth: int
    groups: int
    use_linear_projection: bool
    only_cross_attention: bool
    upcast: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        # A 1x1 conv and a linear layer are the same map on NHWC; only the stored layout differs.
        project = (lambda name: layers.dense(c, name=name, **kw)) if self.use_linear_projection else (
            lambda name: layers.conv(c, 1, name=name, **kw))
        y = layers.group_norm(self.groups, 1e-6, name="norm", **kw)(x)
        y = project("proj_in")(y).reshape(b, h * w, c)
        for i in range(self.depth):
            y = BasicTransformerBlock(self.heads, c // self.heads, self.only_cross_attention, self.upcast,
                                      name=f"transformer_blocks_{i}", **kw)(y, context)
        return x + project("proj_out")(y.reshape(b, h, w, c))


class _Block(nn.Module):
    """Shared plumbing of the down, mid and up blocks: block `index`'s settings from the config."""

    config: UNetConfig
    index: int
    gradient_checkpointing: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, name: str, scale: float = 1.0):
        cfg = self.config
        cls = nn.remat(layers.ResnetBlock2D) if self.gradient_checkpointing else layers.ResnetBlock2D
        return cls(cfg.block_out_channels[self.index], cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,
                   cfg.resnet_time_scale_shift, scale, name=name, dtype=self.dtype, param_dtype=self.param_dtype)

    def transformer(self, name: str, only_cross: bool, depth: int):
        cfg = self.config
        cls = nn.remat(Transformer2D) if self.gradient_checkpointing else Transformer2D
        return cls(cfg.heads[self.index], depth, cfg.norm_num_groups, cfg.use_linear_projection, only_cross, cfg.upcast_attention,
                   name=name, dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def only_cross(self) -> bool:
        return self.config.per_block("only_cross_attention")[self.index]


class DownBlock(_Block):
    """CrossAttnDownBlock2D or DownBlock2D; returns the output and the skips it leaves behind."""

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, i = self.config, self.index
        attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        skips = []
        for j in range(cfg.per_block("layers_per_block")[i]):
            x = self.resnet(f"resnets_{j}")(x, temb)
            if attention:
                depth = cfg.transformer_depths(i)[j]
                x = self.transformer(f"attentions_{j}", self.only_cross, depth)(x, context)
            skips.append(x)
        if i < cfg.num_blocks - 1:
            x = layers.Downsample2D(cfg.block_out_channels[i], cfg.downsample_padding, name="downsamplers_0",
                                    dtype=self.dtype, param_dtype=self.param_dtype)(x)
            skips.append(x)
        return x, skips


class MidBlock(_Block):
    """resnet, cross-attention transformer, resnet at the lowest resolution (or one resnet alone)."""

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.config
        x = self.resnet("resnets_0", cfg.mid_block_scale_factor)(x, temb)
        if cfg.mid_block_type == "UNetMidBlock2D":  # diffusers builds it with a single resnet here
            return x
        # diffusers' UNetMidBlock2DCrossAttn always has self-attention: (mid_block_)only_cross_attention
        # reaches only the SimpleCrossAttn mid block, which jdiff does not implement.
        x = self.transformer("attentions_0", False, cfg.mid_transformer_depth)(x, context)
        return self.resnet("resnets_1", cfg.mid_block_scale_factor)(x, temb)


class UpBlock(_Block):
    """CrossAttnUpBlock2D or UpBlock2D (`index` counts down-path blocks); each resnet eats one skip."""

    up_index: int = 0

    @nn.compact
    def __call__(self, x, temb, context, skips, upsample_size):
        cfg, i = self.config, self.index
        attention = cfg.up_block_types[self.up_index] == "CrossAttnUpBlock2D"
        for j in range(len(skips)):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = self.resnet(f"resnets_{j}")(x, temb)
            if attention:
                depth = cfg.transformer_depths(i, up=True)[j]
                x = self.transformer(f"attentions_{j}", self.only_cross, depth)(x, context)
        if upsample_size is not None:
            x = layers.Upsample2D(cfg.block_out_channels[i], name="upsamplers_0", dtype=self.dtype,
                                  param_dtype=self.param_dtype)(x, upsample_size)
        return x


def add_control_residuals(skips: list, down: Optional[Sequence[jax.Array]], mid: Optional[jax.Array]) -> list:
    """The skips with a ControlNet's residuals added, one to one (a residual may be pooled to
    [B, 1, 1, C], as global_pool_conditions makes them, and broadcasts)."""
    if down is None or mid is None:
        # diffusers ignores a mid residual alone, and reads down residuals without a mid one as a
        # T2I-Adapter's (added inside the blocks): either would silently differ from a ControlNet.
        raise ValueError("pass down_block_additional_residuals and mid_block_additional_residual together (a "
                         "ControlNet returns both); T2I-Adapter residuals are not supported.")
    if len(down) != len(skips):
        raise ValueError(f"down_block_additional_residuals has {len(down)} entries, but this U-Net has "
                         f"{len(skips)} skip connections.")
    return [skip + jnp.asarray(residual, skip.dtype) for skip, residual in zip(skips, down)]


class UNet2DConditionModel(nn.Module):
    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False  # recompute resnets and transformers in the backward pass

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
                 timestep_cond: Optional[jax.Array] = None, added_cond: Optional[dict] = None,
                 down_block_additional_residuals: Optional[Sequence[jax.Array]] = None,
                 mid_block_additional_residual: Optional[jax.Array] = None) -> jax.Array:
        """down_block_additional_residuals, mid_block_additional_residual: a ControlNet's outputs
        (controlnet.ControlNetModel), added to the skips and to the mid block's output; both or neither."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(gradient_checkpointing=self.gradient_checkpointing, **kw)
        c0 = cfg.block_out_channels[0]

        temb = time_conditioning(cfg, sample.shape[0], timesteps, context, timestep_cond, added_cond, **kw)

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        x = layers.conv(c0, cfg.conv_in_kernel, name="conv_in", **kw)(sample.astype(self.dtype))
        context = context.astype(self.dtype)

        skips = [x]
        for i in range(cfg.num_blocks):
            x, block_skips = DownBlock(cfg, i, name=f"down_blocks_{i}", **block_kw)(x, temb, context)
            skips += block_skips
        control = down_block_additional_residuals is not None or mid_block_additional_residual is not None
        if control:
            skips = add_control_residuals(skips, down_block_additional_residuals, mid_block_additional_residual)

        if cfg.mid_block_type is not None:
            x = MidBlock(cfg, cfg.num_blocks - 1, name="mid_block", **block_kw)(x, temb, context)
        if control:  # also without a mid block, as diffusers
            x = x + jnp.asarray(mid_block_additional_residual, x.dtype)

        for i in range(cfg.num_blocks):
            index = cfg.num_blocks - 1 - i
            n = cfg.per_block("layers_per_block")[index] + 1
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size: odd latent sizes do not double exactly.
            size = skips[-1].shape[1:3] if index > 0 else None
            x = UpBlock(cfg, index, up_index=i, name=f"up_blocks_{i}", **block_kw)(
                x, temb, context, block_skips, size)

        if cfg.norm_num_groups:
            x = layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x)
            x = layers.activation(cfg.act_fn)(x)
        return layers.conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **kw)(x)
