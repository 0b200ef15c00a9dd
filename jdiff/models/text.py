"""CLIP text transformer, the Flax twin of transformers' CLIPTextModel (and ...WithProjection).

Call: `text.apply({"params": p}, input_ids[B,77])` -> CLIPTextOutput with `.last_hidden_state`
[B,77,D] and `.pooler_output` [B,D] (the end-of-text token's state), `.text_embeds` when the
model has a projection, and `.hidden_states` (embeddings, then every layer) when asked.
"""

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jdiff.errors import ConfigError
from jdiff.models import layers
from jdiff.models.config import config_to_dict, parse_config

Dtype = Any

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
}
# Keys that transformers writes into config.json without architectural meaning.
_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "attention_dropout",
    "dropout", "initializer_range", "initializer_factor", "output_hidden_states", "output_attentions",
    "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    "tie_word_embeddings", "name_or_path",
})


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    with_projection: bool = False  # CLIPTextModelWithProjection: adds `text_projection`

    @classmethod
    def from_dict(cls, raw: dict, source: str = "text encoder config") -> "CLIPTextConfig":
        architectures = raw.get("architectures") or []
        config = parse_config(cls, raw, source=source, ignored=_IGNORED)
        if "CLIPTextModelWithProjection" in architectures:
            config = dataclasses.replace(config, with_projection=True)
        return config

    def to_dict(self) -> dict:
        raw = config_to_dict(self)
        projection = raw.pop("with_projection")
        raw["architectures"] = ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"]
        return raw

    def validate(self, source: str) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} does not split into "
                              f"{self.num_attention_heads} heads.")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {self.hidden_act!r} is not supported; use one of "
                              f"{sorted(ACTIVATIONS)}.")


def example_inputs(config: CLIPTextConfig) -> tuple:
    return (jnp.zeros((1, config.max_position_embeddings), jnp.int32),)


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    text_embeds: Optional[jax.Array] = None
    hidden_states: Optional[tuple] = None


# The encoder modules below read only the transformer fields (hidden_size, intermediate_size,
# num_attention_heads, num_hidden_layers, hidden_act, layer_norm_eps) that CLIPTextConfig shares
# with clip_vision.CLIPVisionConfig: the image encoder reuses them, with no mask.
class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, d = x.shape
        n = cfg.num_attention_heads
        split = lambda y: y.reshape(b, t, n, d // n)
        q, k, v = (split(layers.dense(d, name=f"{p}_proj", **kw)(x)) for p in ("q", "k", "v"))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(b, t, d)
        return layers.dense(d, name="out_proj", **kw)(out)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: layers.layer_norm(cfg.layer_norm_eps, name=name, **kw)
        x = x + CLIPAttention(cfg, name="self_attn", **kw)(norm("layer_norm1")(x), mask)
        return x + MLP(cfg, name="mlp", **kw)(norm("layer_norm2")(x))


class MLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.dense(self.config.intermediate_size, name="fc1", **kw)(x)
        return layers.dense(self.config.hidden_size, name="fc2", **kw)(ACTIVATIONS[self.config.hidden_act](h))


class CLIPEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", **kw)(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding", **kw)(
            jnp.arange(input_ids.shape[1])[None])
        return tokens + positions


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype
    param_dtype: Dtype
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> list:
        Layer = nn.remat(CLIPEncoderLayer) if self.gradient_checkpointing else CLIPEncoderLayer
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = Layer(self.config, name=f"layers_{i}", dtype=self.dtype, param_dtype=self.param_dtype)(x, mask)
            states.append(x)
        return states


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype
    param_dtype: Dtype
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array]) -> tuple:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = input_ids.shape[1]
        if t > cfg.max_position_embeddings:
            raise ValueError(f"input_ids have {t} tokens; this text encoder takes at most "
                             f"{cfg.max_position_embeddings}.")
        x = CLIPEmbeddings(cfg, name="embeddings", **kw)(input_ids)
        # Causal, and padded keys hidden when a mask is given: [B, 1, T, T] for dot_product_attention.
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        states = CLIPEncoder(cfg, gradient_checkpointing=self.gradient_checkpointing, name="encoder", **kw)(x, mask)
        last = layers.layer_norm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(states[-1])
        # The pooled state sits at the end-of-text token. Old configs (eos_token_id 2) mark it as the
        # largest id, which the CLIP vocabulary's <|endoftext|> is.
        if cfg.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos]
        return last, pooled, tuple(states)


class CLIPTextModel(nn.Module):
    """CLIP text encoder; with `config.with_projection`, also CLIPTextModelWithProjection's head."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        last, pooled, states = CLIPTextTransformer(self.config, gradient_checkpointing=self.gradient_checkpointing,
                                                   name="text_model", **kw)(input_ids, attention_mask)
        embeds = None
        if self.config.with_projection:
            embeds = layers.dense(self.config.projection_dim, name="text_projection", use_bias=False, **kw)(pooled)
        return CLIPTextOutput(last, pooled, embeds, states if output_hidden_states else None)


def clip_skip_hidden_state(params: dict, output: CLIPTextOutput, clip_skip: int, config: CLIPTextConfig):
    """The prompt embedding `clip_skip` layers before the last, as diffusers' pipelines compute it.

    diffusers applies the final layer norm to `hidden_states[-(clip_skip + 1)]`; clip_skip=0 is the
    ordinary last_hidden_state. Needs `output_hidden_states=True` in the call that made `output`.
    """
    if clip_skip == 0:
        return output.last_hidden_state
    norm = layers.layer_norm(config.layer_norm_eps, jnp.float32, jnp.float32, name=None)
    state = output.hidden_states[-(clip_skip + 1)]
    return norm.apply({"params": params["text_model"]["final_layer_norm"]}, state).astype(state.dtype)
