"""T5 encoder, the Flax twin of transformers' T5EncoderModel: the long-prompt text encoder that SD3
and Flux ship (t5-v1_1-xxl).

Call: `t5.apply({"params": p}, input_ids[B, L], attention_mask=None)` -> last_hidden_state
[B, L, d_model], after the final RMS norm. The feed-forward is v1.1's gated GELU or v1.0's ReLU as
`feed_forward_proj` says. Attention scores are not scaled by 1/sqrt(d_kv) (T5 folds that into its
initialisation) and carry a learned bias per head and bucket of relative position, which the first
block owns and every block adds.
"""

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.errors import ConfigError
from jdiff.models import layers
from jdiff.models.config import config_to_dict, parse_config

Dtype = Any

ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "silu": nn.silu,
}
# Keys that transformers writes into a T5 config.json without meaning for the encoder.
_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "dropout_rate",
    "classifier_dropout", "initializer_factor", "use_cache", "is_encoder_decoder", "tie_word_embeddings",
    "num_decoder_layers", "scale_decoder_outputs", "decoder_start_token_id", "output_past", "n_positions",
    "task_specific_params", "name_or_path", "gradient_checkpointing", "output_hidden_states",
    "output_attentions", "return_dict", "id2label", "label2id",
})


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of a transformers T5 `config.json` that shape the encoder (transformers' defaults)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (v1.0), "gated-gelu" (v1.1), "gated-silu", ...
    pad_token_id: int = 0
    eos_token_id: int = 1

    @classmethod
    def from_dict(cls, raw: dict, source: str = "T5 config") -> "T5Config":
        raw = dict(raw)
        # transformers derives these two from feed_forward_proj and writes them back; a file where
        # they disagree describes a model transformers itself would not build.
        derived = {"dense_act_fn": raw.pop("dense_act_fn", None), "is_gated_act": raw.pop("is_gated_act", None)}
        config = parse_config(cls, raw, source=source, ignored=_IGNORED, unsupported_defaults={"is_decoder": False})
        for key, value in derived.items():
            if value is not None and value != getattr(config, key):
                raise ConfigError(f"{source}: {key} = {value!r} disagrees with feed_forward_proj "
                                  f"{config.feed_forward_proj!r} (which implies {getattr(config, key)!r}).")
        return config

    def to_dict(self) -> dict:
        return {"architectures": ["T5EncoderModel"], "model_type": "t5", "is_encoder_decoder": False,
                **config_to_dict(self), "dense_act_fn": self.dense_act_fn, "is_gated_act": self.is_gated_act}

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        # transformers' rule: "gated-gelu" means the tanh approximation (v1.1 was trained with it).
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    def validate(self, source: str) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.dense_act_fn not in ACTIVATIONS:
            raise ConfigError(f"{source}: feed_forward_proj {self.feed_forward_proj!r} is not supported; use "
                              f"ACT or gated-ACT with ACT one of {sorted(ACTIVATIONS)}.")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_max_distance < 2:
            raise ConfigError(f"{source}: relative_attention_num_buckets must be at least 4 and "
                              "relative_attention_max_distance at least 2.")


def example_inputs(config: T5Config) -> tuple:
    return (jnp.zeros((1, 8), jnp.int32),)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket [query, key] of each key's position relative to the query's, as the T5 encoder (a
    bidirectional one) buckets them: half the buckets for keys after the query; within each half,
    exact distances below a quarter of the buckets, then logarithmic bins up to max_distance.
    Shapes are static, so this is a host constant, computed in float32 as transformers does."""
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) at distance 0, which takes the exact branch
        scaled = (np.log(distance.astype(np.float32) / max_exact) / math.log(max_distance / max_exact)
                  * (half - max_exact))
    large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


def _clamp_float16(x: jax.Array) -> jax.Array:
    """transformers' guard against float16 overflow in T5's residual stream (bfloat16 needs none)."""
    if x.dtype != jnp.float16:
        return x
    top = jnp.finfo(jnp.float16).max
    limit = jnp.where(jnp.isinf(x).any(), top - 1000, top).astype(x.dtype)
    return jnp.clip(x, -limit, limit)


class T5Attention(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: Optional[jax.Array], mask: Optional[jax.Array]):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, _ = x.shape
        inner = cfg.num_heads * cfg.d_kv
        split = lambda y: y.reshape(b, t, cfg.num_heads, cfg.d_kv)
        q, k, v = (split(layers.dense(inner, name=name, use_bias=False, **kw)(x)) for name in ("q", "k", "v"))
        if position_bias is None:
            buckets = relative_position_buckets(t, t, cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)
            table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, name="relative_attention_bias", **kw)
            position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]  # [1, N, T, T]
        out = jax.nn.dot_product_attention(q, k, v, bias=position_bias.astype(q.dtype), mask=mask, scale=1.0)
        return layers.dense(cfg.d_model, name="o", use_bias=False, **kw)(out.reshape(b, t, inner)), position_bias


class T5LayerSelfAttention(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, position_bias, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.RMSNorm(epsilon=self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
        h, position_bias = T5Attention(self.config, self.has_relative_attention_bias, name="SelfAttention", **kw)(
            h, position_bias, mask)
        return x + h, position_bias


class T5DenseReluDense(nn.Module):
    config: T5Config
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        act = ACTIVATIONS[cfg.dense_act_fn]
        if cfg.is_gated_act:
            h = act(layers.dense(cfg.d_ff, name="wi_0", **kw)(x)) * layers.dense(cfg.d_ff, name="wi_1", **kw)(x)
        else:
            h = act(layers.dense(cfg.d_ff, name="wi", **kw)(x))
        return layers.dense(cfg.d_model, name="wo", **kw)(h)


class T5LayerFF(nn.Module):
    config: T5Config
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.RMSNorm(epsilon=self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
        return x + T5DenseReluDense(self.config, name="DenseReluDense", **kw)(h)


class T5Block(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, position_bias, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, position_bias = T5LayerSelfAttention(self.config, self.has_relative_attention_bias, name="layer_0", **kw)(
            x, position_bias, mask)
        x = _clamp_float16(x)
        return _clamp_float16(T5LayerFF(self.config, name="layer_1", **kw)(x)), position_bias


class T5Stack(nn.Module):
    config: T5Config
    dtype: Dtype
    param_dtype: Dtype
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        Block = nn.remat(T5Block) if self.gradient_checkpointing else T5Block
        position_bias = None
        for i in range(self.config.num_layers):
            x, position_bias = Block(self.config, i == 0, name=f"block_{i}", **kw)(x, position_bias, mask)
        return nn.RMSNorm(epsilon=self.config.layer_norm_epsilon, name="final_layer_norm", **kw)(x)


class T5EncoderModel(nn.Module):
    """transformers' T5EncoderModel: token embedding (`shared`) and the encoder stack."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(cfg.vocab_size, cfg.d_model, name="shared", **kw)(input_ids)
        # Padded keys hidden: [B, 1, 1, L] for dot_product_attention. SD3 and Flux pass no mask.
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        return T5Stack(cfg, gradient_checkpointing=self.gradient_checkpointing, name="encoder", **kw)(x, mask)
