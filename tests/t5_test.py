"""The Flax T5 encoder against transformers' T5EncoderModel on the same small random weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5Config as TorchT5Config
from transformers import T5EncoderModel as TorchT5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention as TorchT5Attention

from jdiff import convert
from jdiff.errors import CheckpointError, ConfigError
from jdiff.models import t5

# Small, but with sequences longer than max_distance so the logarithmic buckets are reached.
TINY = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=12)


def torch_t5(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    model = TorchT5EncoderModel(TorchT5Config(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # layer norms start at 1: move them so a dropped scale would show
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model


def run_torch(model, ids, mask=None):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.last_hidden_state.numpy()


def assert_close(actual, expected, rtol=1e-4):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu", "gated-silu"])
def test_matches_transformers(tmp_path, feed_forward_proj):
    model = torch_t5(tmp_path, feed_forward_proj=feed_forward_proj)
    module, params = convert.load_t5_encoder(tmp_path)
    assert module.config.feed_forward_proj == feed_forward_proj
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 30))
    assert_close(np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(ids))), run_torch(model, ids))


def test_padding_mask_matches_transformers(tmp_path):
    model = torch_t5(tmp_path, feed_forward_proj="gated-gelu")
    module, params = convert.load_t5_encoder(tmp_path)
    ids = np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 17))
    mask = np.ones_like(ids)
    mask[0, 9:] = 0
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    theirs = run_torch(model, ids, mask)
    assert_close(ours[0, :9], theirs[0, :9])  # padded positions' outputs are not used by anyone
    assert_close(ours[1], theirs[1])
    unmasked = np.asarray(module.apply({"params": params}, jnp.asarray(ids)))
    assert np.abs(unmasked[0, :9] - ours[0, :9]).max() > 1e-3  # the mask matters


def test_position_buckets_equal_transformers_for_sd3_lengths():
    """SD3 and Flux run t5-v1_1-xxl (32 buckets, max distance 128) on up to 512 tokens."""
    for buckets, distance, length in ((32, 128, 512), (8, 12, 40)):
        relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        expected = TorchT5Attention._relative_position_bucket(relative, True, buckets, distance).numpy()
        np.testing.assert_array_equal(t5.relative_position_buckets(length, length, buckets, distance), expected)


def test_save_loads_in_transformers_and_sharded_files_load(tmp_path):
    model = torch_t5(tmp_path / "src", feed_forward_proj="gated-gelu")
    module, params = convert.load_t5_encoder(tmp_path / "src")
    convert.save_t5_encoder(module, params, tmp_path / "ours")
    reloaded = TorchT5EncoderModel.from_pretrained(tmp_path / "ours").eval()
    ids = np.random.default_rng(2).integers(0, TINY["vocab_size"], (1, 20))
    np.testing.assert_allclose(run_torch(reloaded, ids), run_torch(model, ids), rtol=0, atol=1e-6)
    # Released t5-v1_1-xxl folders are sharded with an index, and may store the tied embedding twice.
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    module2, params2 = convert.load_t5_encoder(tmp_path / "sharded")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, params2))


def test_gradient_checkpointing_and_bfloat16(tmp_path):
    torch_t5(tmp_path, feed_forward_proj="gated-gelu")
    module, params = convert.load_t5_encoder(tmp_path)
    remat, _ = convert.load_t5_encoder(tmp_path, gradient_checkpointing=True)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, TINY["vocab_size"], (2, 16)))
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, ids) ** 2)
    g1, g2 = jax.grad(loss(module))(params), jax.grad(loss(remat))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)
    bf16, _ = convert.load_t5_encoder(tmp_path, dtype=jnp.bfloat16)
    full = module.apply({"params": params}, ids)
    half = bf16.apply({"params": params}, ids)
    assert half.dtype == jnp.bfloat16
    assert float(jnp.abs(half.astype(jnp.float32) - full).max()) < 0.05 * float(jnp.abs(full).max())


def test_bad_configs_and_files_are_named(tmp_path):
    torch_t5(tmp_path, feed_forward_proj="gated-gelu")
    config = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ConfigError, match="is_decoder"):
        t5.T5Config.from_dict({**config, "is_decoder": True})
    with pytest.raises(ConfigError, match="dense_act_fn"):
        t5.T5Config.from_dict({**config, "dense_act_fn": "relu"})
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        t5.T5Config.from_dict({**config, "feed_forward_proj": "gated-tanh", "dense_act_fn": None})
    with pytest.raises(ConfigError, match="d_modle"):
        t5.T5Config.from_dict({**config, "d_modle": 3})
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_layers": 4}))
    with pytest.raises(CheckpointError, match="missing"):
        convert.load_t5_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["CLIPTextModel"]}))
    with pytest.raises(CheckpointError, match="CLIPTextModel, not a T5EncoderModel"):
        convert.load_t5_encoder(tmp_path)


def test_tokenizer_loads_from_a_tokenizer_json_folder(tmp_path):
    from tiny_models import write_tiny_t5_tokenizer

    reference = write_tiny_t5_tokenizer(tmp_path / "tok")
    tokenizer = convert.load_t5_tokenizer(tmp_path / "tok", max_length=12)
    prompts = ["a small red circle at the top left", "a teal thing"]
    kwargs = dict(padding="max_length", max_length=12, truncation=True)
    assert tokenizer(prompts, **kwargs).input_ids == reference(prompts, **kwargs).input_ids
    assert tokenizer(prompts[:1], **kwargs).input_ids[0][8:] == [1, 0, 0, 0]  # </s>, then padding
    (tmp_path / "spiece_only").mkdir()
    (tmp_path / "spiece_only" / "spiece.model").write_bytes(b"")
    with pytest.raises(CheckpointError, match="spiece.model only"):
        convert.load_t5_tokenizer(tmp_path / "spiece_only")
