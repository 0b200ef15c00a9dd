"""CLIP vision transformer with its projection, the Flax twin of transformers'
CLIPVisionModelWithProjection: the image encoder IP-Adapter conditions on.

Call: `model.apply({"params": p}, pixels[B, H, W, C])` with pixels as `clip_preprocess.preprocess`
makes them (NHWC, normalised) -> CLIPVisionOutput with `.image_embeds` [B, projection_dim],
`.last_hidden_state` [B, 1 + patches, D], `.pooler_output` [B, D] (the class token after the
post-layernorm) and, when asked, `.hidden_states` (the encoder's input, then every layer's output;
IP-Adapter Plus reads `hidden_states[-2]`).

The transformer layers are text.py's: a vision tower is the same pre-norm encoder without a mask.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jdiff.errors import ConfigError
from jdiff.models import layers, text
from jdiff.models.config import config_to_dict, parse_config

Dtype = Any

ARCHITECTURE = "CLIPVisionModelWithProjection"
MODEL_TYPE = "clip_vision_model"


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, raw: dict, source: str = "image encoder config") -> "CLIPVisionConfig":
        model_type = raw.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            # A whole CLIPModel ("clip") nests this config under `vision_config`; it is not one.
            raise ConfigError(f"{source}: model_type {model_type!r} is not a CLIP vision model ({MODEL_TYPE!r}).")
        return parse_config(cls, raw, source=source, ignored=text._IGNORED)

    def to_dict(self) -> dict:
        return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, **config_to_dict(self)}

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, source: str) -> None:
        # transformers' config types allow [h, w] pairs, but its embeddings only work with squares.
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}.")
        if self.patch_size > self.image_size:
            raise ConfigError(f"{source}: patch_size {self.patch_size} is larger than image_size {self.image_size}.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} does not split into "
                              f"{self.num_attention_heads} heads.")
        if self.hidden_act not in text.ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {self.hidden_act!r} is not supported; use one of "
                              f"{sorted(text.ACTIVATIONS)}.")


def example_inputs(config: CLIPVisionConfig) -> tuple:
    return (jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32),)


@flax.struct.dataclass
class CLIPVisionOutput:
    image_embeds: jax.Array
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: Optional[tuple] = None


class CLIPVisionEmbeddings(nn.Module):
    """Patches as tokens behind a learned class token, plus learned positions."""

    config: CLIPVisionConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = cfg.patch_size
        # A stride-p conv over p x p patches is one linear map per patch (VALID drops a ragged edge,
        # as PyTorch's conv does).
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          name="patch_embedding", **kw)(pixels.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major over the grid, as torch's flatten
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), self.param_dtype)
        tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size)), patches], axis=1)
        positions = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, name="position_embedding", **kw)(
            jnp.arange(cfg.num_patches + 1)[None])
        return tokens + positions


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype
    param_dtype: Dtype
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: layers.layer_norm(cfg.layer_norm_eps, name=name, **kw)
        x = CLIPVisionEmbeddings(cfg, name="embeddings", **kw)(pixels)
        x = norm("pre_layrnorm")(x)  # sic: the checkpoint key is spelled so
        # Every token sees every other: no mask.
        states = text.CLIPEncoder(cfg, gradient_checkpointing=self.gradient_checkpointing, name="encoder",
                                  **kw)(x, None)
        pooled = norm("post_layernorm")(states[-1][:, 0])  # only the class token is normalised
        return states[-1], pooled, tuple(states)


class CLIPVisionModelWithProjection(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, pixels: jax.Array, output_hidden_states: bool = False) -> CLIPVisionOutput:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixels have shape {tuple(pixels.shape)}; this image encoder takes NHWC "
                             f"[B, {', '.join(map(str, expected))}] (clip_preprocess.preprocess makes them).")
        last, pooled, states = CLIPVisionTransformer(cfg, gradient_checkpointing=self.gradient_checkpointing,
                                                     name="vision_model", **kw)(pixels)
        embeds = layers.dense(cfg.projection_dim, name="visual_projection", use_bias=False, **kw)(pooled)
        return CLIPVisionOutput(embeds, last, pooled, states if output_hidden_states else None)
