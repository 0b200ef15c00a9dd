"""ControlNet (Zhang, Rao and Agrawala, 2023), the Flax twin of diffusers' ControlNetModel.

A ControlNet is a trainable copy of a U-Net's encoder: its time (and SDXL text-time) embedding,
`conv_in`, down blocks and mid block, built from unet.py's own blocks. A small conv stack brings the
control image down to the latent size and adds it after `conv_in`. Every skip the copy leaves, and
its mid-block output, passes through a 1x1 convolution that starts at zero ("zero convolution"); the
results are residuals for the U-Net, which adds them to its own skips and mid-block output:

    down, mid = controlnet.apply({"params": p}, x[B,H,W,C], t[B], context[B,L,D],
                                 control[B,8H,8W,3] in [0, 1], conditioning_scale=1.0)
    eps = unet.apply({"params": q}, x, t, context, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid)

SDXL ControlNets (addition_embed_type="text_time") also take `added_cond`, as the U-Net does.
"""

import dataclasses
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.errors import ConfigError
from jdiff.models import layers, unet
from jdiff.models.config import config_to_dict, parse_config

Dtype = Any
IntOrTuple = Union[int, tuple]

MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")  # diffusers' ControlNet has no mid-less form
CHANNEL_ORDERS = ("rgb", "bgr")

# diffusers ControlNetModel arguments that jdiff does not implement, with the value accepted.
_UNSUPPORTED = {"encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None,
                "num_class_embeds": None}
_UNET_FIELDS = frozenset(f.name for f in dataclasses.fields(unet.UNetConfig))


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """The fields of a diffusers ControlNet `config.json`, with diffusers' defaults. All but the last
    four mean what they mean in unet.UNetConfig (see `encoder`)."""

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    only_cross_attention: Union[bool, tuple] = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: Optional[int] = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: IntOrTuple = 1
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    addition_embed_type: Optional[str] = None
    addition_embed_type_num_heads: int = 64
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    # The control image: its channels, the widths of the convs that embed it (each after the first
    # halves the resolution), the channel order the checkpoint was trained on, and whether the
    # residuals are averaged over the image (shuffle-style ControlNets that carry no layout).
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    @classmethod
    def from_dict(cls, raw: dict, source: str = "controlnet config") -> "ControlNetConfig":
        return parse_config(cls, raw, source=source, unsupported_defaults=_UNSUPPORTED)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @property
    def encoder(self) -> unet.UNetConfig:
        """The U-Net config whose embeddings, down blocks and mid block this ControlNet copies: unet.py's
        blocks read their settings from it. Its up path mirrors the down path and is never built."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _UNET_FIELDS}
        up = tuple("CrossAttnUpBlock2D" if kind == "CrossAttnDownBlock2D" else "UpBlock2D"
                   for kind in self.down_block_types[::-1])
        return unet.UNetConfig(**shared, up_block_types=up)

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def control_downscale(self) -> int:
        """How many times larger than the latents the control image is: 8 for the released
        ControlNets (three stride-2 convolutions, the VAE's factor)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def validate(self, source: str) -> None:
        if self.mid_block_type not in MID_BLOCKS:
            raise ConfigError(f"{source}: a ControlNet's mid_block_type must be one of {MID_BLOCKS}, "
                              f"got {self.mid_block_type!r}.")
        # diffusers' ControlNetModel takes these as single values (a tuple breaks its constructor).
        for name in ("layers_per_block", "cross_attention_dim"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{source}: a ControlNet's {name} is one int, got {getattr(self, name)!r}.")
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise ConfigError(f"{source}: controlnet_conditioning_channel_order "
                              f"{self.controlnet_conditioning_channel_order!r} is not one of {CHANNEL_ORDERS}.")
        widths = self.conditioning_embedding_out_channels
        if not isinstance(widths, tuple) or not widths or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ConfigError(f"{source}: conditioning_embedding_out_channels must list positive widths, "
                              f"got {widths!r}.")
        if self.conditioning_channels < 1:
            raise ConfigError(f"{source}: conditioning_channels must be positive, got {self.conditioning_channels}.")
        self.encoder.validate(source, up_blocks=False)


def example_inputs(config: ControlNetConfig) -> tuple:
    """Smallest inputs that reach every parameter (for `init` under `jax.eval_shape`)."""
    x, t, context, *rest = unet.example_inputs(config.encoder)
    size = x.shape[1] * config.control_downscale
    control = jnp.zeros((1, size, size, config.conditioning_channels))
    added = rest[-1] if config.addition_embed_type == "text_time" else None
    return x, t, context, control, 1.0, added


class ZeroConv(nn.Module):
    """A square convolution whose kernel and bias start at zero: a new ControlNet leaves the U-Net
    unchanged until training moves them. The parameters are layers.conv's; a 1x1 runs as a matrix
    product, as layers.PointwiseConv does (XLA:CPU differentiates that faster)."""

    features: int
    kernel: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        zeros = nn.initializers.zeros_init()
        kernel = self.param("kernel", zeros, (self.kernel, self.kernel, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.kernel == 1:
            return (x.reshape(-1, x.shape[-1]) @ kernel[0, 0] + bias).reshape(*x.shape[:-1], self.features)
        pad = (self.kernel - 1) // 2
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


class ControlNetConditioningEmbedding(nn.Module):
    """The control image [B, sH, sW, C] -> features [B, H, W, `features`], s = 2 ** (len(widths) - 1):
    3x3 convolutions with SiLU, each width once at full resolution and then once with stride 2 into
    the next width, and a zero convolution out."""

    features: int
    widths: tuple
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(layers.conv(self.widths[0], 3, name="conv_in", **kw)(image))
        for i, (width, next_width) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            x = nn.silu(layers.conv(width, 3, name=f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(layers.conv(next_width, 3, name=f"blocks_{2 * i + 1}", stride=2, **kw)(x))
        return ZeroConv(self.features, 3, name="conv_out", **kw)(x)


def residual_scales(count: int, conditioning_scale, guess_mode, global_pool: bool) -> jax.Array:
    """The factor of each of `count` residuals (the skips shallowest first, the mid block's last).

    conditioning_scale and guess_mode may be traced: changing them never recompiles. In guess mode
    (made for sampling without a prompt) the factors also rise on a log scale from 0.1 at the first
    skip to 1 at the mid block, so the low-resolution levels steer most; a global-pool ControlNet
    ignores it, as diffusers does."""
    scale = jnp.asarray(conditioning_scale, jnp.float32)
    if global_pool:
        return jnp.broadcast_to(scale, (count,))
    ramp = jnp.logspace(-1.0, 0.0, count, dtype=jnp.float32)
    return scale * jnp.where(jnp.asarray(guess_mode), ramp, 1.0)


class ControlNetModel(nn.Module):
    """A U-Net encoder copy that turns a control image into residuals for the U-Net (module docstring)."""

    config: ControlNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False  # recompute resnets and transformers in the backward pass

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array, controlnet_cond: jax.Array,
                 conditioning_scale=1.0, added_cond: Optional[dict] = None, guess_mode=False) -> tuple:
        """-> (down_block_residuals: one per U-Net skip, [B, h, w, c] each; mid_block_residual), in
        `dtype`; pooled to [B, 1, 1, c] when the config says global_pool_conditions.

        controlnet_cond: the control image [B, sH, sW, conditioning_channels] in [0, 1], RGB, s the
        config's control_downscale (8) times the latent size."""
        cfg, encoder = self.config, self.config.encoder
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(gradient_checkpointing=self.gradient_checkpointing, **kw)

        temb = unet.time_conditioning(encoder, sample.shape[0], timesteps, context, None, added_cond, **kw)
        context = context.astype(self.dtype)
        x = layers.conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(sample.astype(self.dtype))

        image_size = jnp.shape(controlnet_cond)[1:3]
        control = jnp.asarray(controlnet_cond).astype(self.dtype)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            control = control[..., ::-1]  # the checkpoint learned from BGR images
        control = ControlNetConditioningEmbedding(cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels,
                                                  name="controlnet_cond_embedding", **kw)(control)
        if control.shape[1:3] != x.shape[1:3]:
            s, (h, w) = cfg.control_downscale, x.shape[1:3]
            raise ValueError(f"controlnet_cond is {image_size[0]}x{image_size[1]} pixels; for "
                             f"{h}x{w} latents this ControlNet takes {s * h}x{s * w} ({s} times the latent size).")
        x = x + control

        skips = [x]
        for i in range(cfg.num_blocks):
            x, block_skips = unet.DownBlock(encoder, i, name=f"down_blocks_{i}", **block_kw)(x, temb, context)
            skips += block_skips
        x = unet.MidBlock(encoder, cfg.num_blocks - 1, name="mid_block", **block_kw)(x, temb, context)

        residuals = [ZeroConv(skip.shape[-1], name=f"controlnet_down_blocks_{k}", **kw)(skip)
                     for k, skip in enumerate(skips)]
        residuals.append(ZeroConv(x.shape[-1], name="controlnet_mid_block", **kw)(x))
        scales = residual_scales(len(residuals), conditioning_scale, guess_mode, cfg.global_pool_conditions)
        residuals = [r * scales[k].astype(r.dtype) for k, r in enumerate(residuals)]
        if cfg.global_pool_conditions:
            residuals = [jnp.mean(r, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(r.dtype)
                         for r in residuals]
        return tuple(residuals[:-1]), residuals[-1]


# The U-Net parts a new ControlNet starts from (diffusers' `ControlNetModel.from_unet`): the rest (the
# control image's embedding and the zero convolutions) starts fresh.
_COPIED_FROM_UNET = ("conv_in", "time_embedding", "add_embedding", "mid_block")


def config_from_unet(unet_config: unet.UNetConfig, **overrides) -> ControlNetConfig:
    """The ControlNet config that fits `unet_config` (its encoder's fields), with `overrides` (e.g.
    conditioning_embedding_out_channels for a VAE whose factor is not 8)."""
    fields = {f.name for f in dataclasses.fields(ControlNetConfig)}
    shared = {name: getattr(unet_config, name) for name in fields & _UNET_FIELDS}
    return ControlNetConfig(**{**shared, **overrides})


def from_unet(unet_module, unet_params, rng, *, dtype=jnp.float32, param_dtype=jnp.float32, **overrides):
    """(ControlNetModel, params): a new ControlNet for `unet_module`, its copied parts holding the
    U-Net's weights (conv_in, time and text-time embeddings, down blocks, mid block), its control
    embedding initialised afresh and its zero convolutions at zero, so it starts as a no-op."""
    module = ControlNetModel(config_from_unet(unet_module.config, **overrides), dtype=dtype, param_dtype=param_dtype)
    fresh = jax.jit(module.init)(rng, *example_inputs(module.config))["params"]
    shared = {name for name in fresh if name in _COPIED_FROM_UNET or name.startswith("down_blocks_")}
    copied = {name: unet_params[name] for name in shared if name in unet_params}
    same = set(copied) == shared and jax.tree.structure(copied) == jax.tree.structure({n: fresh[n] for n in shared})
    if not same or any(a.shape != b.shape for a, b in zip(jax.tree.leaves(copied), jax.tree.leaves(
            {n: fresh[n] for n in copied}))):
        raise ConfigError("these U-Net parameters do not fit the U-Net's config: cannot copy them into a ControlNet.")
    params = {**fresh, **jax.tree.map(lambda a: jnp.asarray(a, param_dtype), copied)}
    return module, params
