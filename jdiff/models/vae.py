"""KL autoencoder (the Stable Diffusion VAE), the Flax twin of diffusers' AutoencoderKL.

Images are NHWC in [-1, 1]; latents are NHWC with `latent_channels` channels, 2**(n_blocks-1) times
smaller. `encode` gives the posterior, `decode` maps (unscaled) latents back to images; use
`scale_latents` / `unscale_latents` to go to and from the diffusion model's latent space.
"""

import dataclasses
import math
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jdiff.errors import ConfigError
from jdiff.models import layers
from jdiff.models.config import config_to_dict, parse_config

Dtype = Any

DOWN_BLOCKS = ("DownEncoderBlock2D",)
UP_BLOCKS = ("UpDecoderBlock2D",)
# diffusers builds every VAE resnet, norm and attention with this epsilon, whatever the config says.
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers `vae/config.json`, with diffusers' defaults.

    Every AutoencoderKL argument is implemented, so nothing is accepted only at its default.
    `force_upcast`, `latents_mean` and `latents_std` do not change the network; they are kept for
    pipelines (run the VAE in float32; per-channel latent normalisation) and for saving.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, tuple] = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, raw: dict, source: str = "vae config") -> "VAEConfig":
        return parse_config(cls, raw, source=source)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (self.num_blocks - 1)

    def validate(self, source: str) -> None:
        n = self.num_blocks
        if n == 0:
            raise ConfigError(f"{source}: block_out_channels is empty.")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"{source}: down_block_types has {len(self.down_block_types)} and "
                              f"up_block_types {len(self.up_block_types)} entries for {n} block_out_channels.")
        for field, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            for name in getattr(self, field):
                if name not in allowed:
                    raise ConfigError(f"{source}: {field} entry {name!r} is not supported; use {allowed[0]!r}.")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise ConfigError(f"{source}: layers_per_block must be a positive integer, not "
                              f"{self.layers_per_block!r}.")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ConfigError(f"{source}: {channels} channels do not split into "
                                  f"norm_num_groups = {self.norm_num_groups} groups.")
        if not self.scaling_factor:
            raise ConfigError(f"{source}: scaling_factor must be non-zero.")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.latent_channels:
                raise ConfigError(f"{source}: {name} has {len(value)} entries for "
                                  f"{self.latent_channels} latent channels.")
        layers.activation(self.act_fn)


def example_inputs(config: VAEConfig) -> tuple:
    """Smallest image that reaches every parameter (for `init` under `jax.eval_shape`)."""
    size = config.downscale
    return (jnp.zeros((1, size, size, config.in_channels)),)


def _channel_stats(config: VAEConfig):
    """Per-channel (mean, std) of the latents when the config records them (some SDXL VAEs), as
    diffusers' SDXL pipelines apply them; (shift_factor, 1) otherwise."""
    if config.latents_mean is not None and config.latents_std is not None:
        return jnp.asarray(config.latents_mean, jnp.float32), jnp.asarray(config.latents_std, jnp.float32)
    return config.shift_factor or 0.0, 1.0


def scale_latents(config: VAEConfig, z: jax.Array) -> jax.Array:
    """VAE latents -> diffusion latents (roughly unit variance)."""
    mean, std = _channel_stats(config)
    return ((z - mean) * config.scaling_factor / std).astype(z.dtype)


def unscale_latents(config: VAEConfig, z: jax.Array) -> jax.Array:
    """Diffusion latents -> VAE latents, ready for `decode`."""
    mean, std = _channel_stats(config)
    return (z * std / config.scaling_factor + mean).astype(z.dtype)


def standardize_latents(config: VAEConfig, params, mean, std) -> tuple[VAEConfig, Any]:
    """Reparametrises a VAE so the posterior means it encodes have per-channel mean 0 and std 1.

    mean, std: per-channel statistics of the current posterior means ([latent_channels] each). The
    affine z' = (z - mean) / std is folded into `quant_conv` (the encoder's last 1x1 convolution;
    the log-variance shifts by -2 log std) and undone in `post_quant_conv` (the decoder's first), so
    decode(encode(x)) is unchanged and scaling_factor becomes 1. Why not a scalar scaling factor
    alone: a small VAE's channels can sit far from zero (measured on the shapes VAE: channel means
    -1.5 to 1.0 with per-channel stds 0.3-0.4), and 1/std of all elements then leaves the picture's
    content a few tenths of a unit under noise of std 1, destroyed at far lower noise levels than
    the schedule assumes. Unlike `shift_factor` or `latents_mean`, which diffusers' Stable Diffusion
    pipelines ignore, folded weights give the same latents in every loader.
    """
    if not (config.use_quant_conv and config.use_post_quant_conv):
        raise ConfigError("standardize_latents needs a VAE with quant_conv and post_quant_conv "
                          "(use_quant_conv / use_post_quant_conv are False).")
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    channels = config.latent_channels
    if mean.shape != (channels,) or std.shape != (channels,) or not bool(jnp.all(std > 0)):
        raise ConfigError(f"standardize_latents needs {channels} means and {channels} positive stds "
                          f"(got shapes {mean.shape}, {std.shape}).")
    quant, post = params["quant_conv"], params["post_quant_conv"]
    scale = jnp.concatenate([1.0 / std, jnp.ones_like(std)])  # mean channels first, then log-variance
    shift = jnp.concatenate([-mean / std, -2.0 * jnp.log(std)])
    new_quant = {"kernel": quant["kernel"] * scale, "bias": quant["bias"] * scale + shift}
    # post_quant_conv(std * z' + mean) = (W * std) z' + (b + mean W), W's input channels on axis 2.
    new_post = {"kernel": post["kernel"] * std[:, None],
                "bias": post["bias"] + mean @ post["kernel"][0, 0]}
    params = {**params, "quant_conv": new_quant, "post_quant_conv": new_post}
    return dataclasses.replace(config, scaling_factor=1.0, shift_factor=None, latents_mean=None,
                               latents_std=None), params


@struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element; a pytree, so it crosses jit."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        mean, logvar = jnp.split(moments, 2, axis=-1)
        # The clip keeps exp(logvar) finite for untrained or degenerate encoders, as diffusers does.
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def _sum(self, x: jax.Array) -> jax.Array:
        return jnp.sum(x, axis=tuple(range(1, x.ndim)))

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> jax.Array:
        """KL(self || other) per batch item; `other` defaults to the standard normal."""
        if other is None:
            return 0.5 * self._sum(self.mean**2 + self.var - 1.0 - self.logvar)
        return 0.5 * self._sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar)

    def nll(self, x: jax.Array) -> jax.Array:
        """Negative log-likelihood of `x` per batch item."""
        return 0.5 * self._sum(math.log(2.0 * math.pi) + self.logvar + (x - self.mean) ** 2 / self.var)


class _Module(nn.Module):
    """Shared plumbing: the config, dtypes, and (optionally rematerialised) resnet constructor."""

    config: VAEConfig
    gradient_checkpointing: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def sub_kw(self) -> dict:
        return dict(config=self.config, gradient_checkpointing=self.gradient_checkpointing, **self.kw)

    def resnet(self, channels: int, name: str) -> nn.Module:
        cls = nn.remat(layers.ResnetBlock2D) if self.gradient_checkpointing else layers.ResnetBlock2D
        return cls(channels, self.config.norm_num_groups, _EPS, self.config.act_fn, name=name, **self.kw)


class MidAttention(_Module):
    """Single-head self-attention over all pixels, pre-GroupNorm, with a residual connection.

    The norm and the projections sit side by side in the checkpoint (`attentions.0.group_norm`,
    `attentions.0.to_q`), so layers.Attention shares this module's scope instead of nesting.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = layers.group_norm(self.config.norm_num_groups, _EPS, name="group_norm", **self.kw)(x)
        # upcast: diffusers computes this softmax in float32 (upcast_softmax); it spans every pixel.
        attn = layers.Attention(1, c, c, qkv_bias=True, upcast=True, name="attn", **self.kw)
        nn.share_scope(self, attn)
        return x + attn(y.reshape(b, h * w, c)).reshape(b, h, w, c)


class MidBlock(_Module):
    """resnet, attention, resnet at the lowest resolution (UNetMidBlock2D without time embedding)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = self.resnet(c, "resnets_0")(x)
        if self.config.mid_block_add_attention:
            cls = nn.remat(MidAttention) if self.gradient_checkpointing else MidAttention
            x = cls(name="attentions_0", **self.sub_kw)(x)
        return self.resnet(c, "resnets_1")(x)


class ResampleBlock(_Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: `num_layers` resnets, then an optional 2x resample."""

    channels: int = 0
    num_layers: int = 1
    resample: Optional[str] = None  # "down", "up" or None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = self.resnet(self.channels, f"resnets_{j}")(x)
        if self.resample == "down":  # padding 0: diffusers pads right/bottom only in the VAE
            x = layers.Downsample2D(self.channels, padding=0, name="downsamplers_0", **self.kw)(x)
        elif self.resample == "up":
            x = layers.Upsample2D(self.channels, name="upsamplers_0", **self.kw)(x)
        return x


class Encoder(_Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = layers.conv(cfg.block_out_channels[0], 3, name="conv_in", **self.kw)(x)
        for i, channels in enumerate(cfg.block_out_channels):
            resample = "down" if i < cfg.num_blocks - 1 else None
            x = ResampleBlock(channels=channels, num_layers=cfg.layers_per_block, resample=resample,
                              name=f"down_blocks_{i}", **self.sub_kw)(x)
        x = MidBlock(name="mid_block", **self.sub_kw)(x)
        return _conv_out(x, 2 * cfg.latent_channels, cfg.norm_num_groups, self.kw)


class Decoder(_Module):
    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels[::-1]
        x = layers.conv(channels[0], 3, name="conv_in", **self.kw)(z)
        x = MidBlock(name="mid_block", **self.sub_kw)(x)
        for i, c in enumerate(channels):
            resample = "up" if i < cfg.num_blocks - 1 else None
            # One resnet more than the encoder's blocks, as diffusers' Decoder builds them.
            x = ResampleBlock(channels=c, num_layers=cfg.layers_per_block + 1, resample=resample,
                              name=f"up_blocks_{i}", **self.sub_kw)(x)
        return _conv_out(x, cfg.out_channels, cfg.norm_num_groups, self.kw)


def _conv_out(x: jax.Array, features: int, groups: int, kw: dict) -> jax.Array:
    """Norm, SiLU, 3x3 conv; diffusers hard-codes SiLU here whatever act_fn says."""
    x = nn.silu(layers.group_norm(groups, _EPS, name="conv_norm_out", **kw)(x))
    return layers.conv(features, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """`encode(images)` -> DiagonalGaussian, `decode(latents)` -> images; `__call__` does both.

    Pick the method with `module.apply(variables, x, method="encode")` (or `AutoencoderKL.encode`).
    The posterior is returned in float32 whatever `dtype` is: it is small, and exp(logvar) and
    the latents fed to the diffusion model lose too much in bfloat16.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False  # recompute resnets and attention in the backward pass

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        sub = dict(config=cfg, gradient_checkpointing=self.gradient_checkpointing, **kw)
        self.encoder = Encoder(**sub)
        self.decoder = Decoder(**sub)
        latent = cfg.latent_channels
        self.quant_conv = layers.conv(2 * latent, 1, name=None, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = layers.conv(latent, 1, name=None, **kw) if cfg.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.encode_moments(images).astype(jnp.float32))

    def encode_moments(self, images: jax.Array) -> jax.Array:
        """The posterior's parameters [B, h, w, 2C] (mean, log-variance), as the network outputs them."""
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    def decode(self, latents: jax.Array) -> jax.Array:
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array, sample_posterior: bool = False,
                 rng: Optional[jax.Array] = None) -> jax.Array:
        """Reconstruction of `images`; sampling the posterior uses `rng` or the "sample" RNG stream."""
        posterior = self.encode(images)
        if sample_posterior:
            z = posterior.sample(self.make_rng("sample") if rng is None else rng)
        else:
            z = posterior.mode()
        return self.decode(z)
