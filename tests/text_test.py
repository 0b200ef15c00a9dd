"""CLIP text encoder parity with transformers on random weights; the tokenizer from a local folder."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig as TorchConfig
from transformers import CLIPTextModel as TorchText
from transformers import CLIPTextModelWithProjection as TorchTextWithProjection

from jdiff.convert import load_text_encoder, load_tokenizer, save_text_encoder
from jdiff.errors import CheckpointError, ConfigError
from jdiff.models.text import clip_skip_hidden_state
from parity import max_rel_error, randomize_torch
from tiny_models import write_tiny_tokenizer

VOCAB = 1000
VARIANTS = {
    # Modern configs find the pooled token by its id; legacy ones (eos_token_id 2) by the largest id.
    "quick_gelu": (TorchText, dict(hidden_act="quick_gelu", eos_token_id=VOCAB - 1)),
    "gelu_legacy_eos": (TorchText, dict(hidden_act="gelu", eos_token_id=2)),
    "with_projection": (TorchTextWithProjection, dict(hidden_act="quick_gelu", eos_token_id=VOCAB - 1)),
}


def make_reference(folder, name):
    cls, overrides = VARIANTS[name]
    config = TorchConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         vocab_size=VOCAB, bos_token_id=0, projection_dim=16, **overrides)
    torch.manual_seed(0)
    model = randomize_torch(cls(config))
    model.save_pretrained(folder)
    return model


def example_ids():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB - 2, (2, 77), generator=gen)
    ids[0, 10] = VOCAB - 1  # end of text early, then padding
    ids[1, 76] = VOCAB - 1
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[0, 11:] = 0
    return ids, mask


def run_both(folder, model, dtype=jnp.float32):
    ids, mask = example_ids()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
    module, params = load_text_encoder(folder, dtype=dtype)
    out = module.apply({"params": params}, ids.numpy(), mask.numpy(), output_hidden_states=True)
    return module, params, out, ref


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_transformers_float32(tmp_path, name):
    model = make_reference(tmp_path, name)
    module, params, out, ref = run_both(tmp_path, model)
    assert max_rel_error(out.last_hidden_state, ref.last_hidden_state) <= 1e-4
    assert max_rel_error(out.hidden_states[1], ref.hidden_states[1]) <= 1e-4
    if name == "with_projection":
        assert max_rel_error(out.text_embeds, ref.text_embeds) <= 1e-4
    else:
        assert max_rel_error(out.pooler_output, ref.pooler_output) <= 1e-4
    # Clip skip as diffusers computes it: final layer norm on an earlier layer's state.
    torch_final_norm = getattr(model, "text_model", model).final_layer_norm
    with torch.no_grad():
        skipped = torch_final_norm(ref.hidden_states[-2])
    assert max_rel_error(clip_skip_hidden_state(params, out, 1, module.config), skipped) <= 1e-4


def test_bfloat16_compute_stays_close(tmp_path):
    model = make_reference(tmp_path, "quick_gelu")
    _, _, out, ref = run_both(tmp_path, model, dtype=jnp.bfloat16)
    hidden = np.asarray(out.last_hidden_state, np.float32)
    assert np.isfinite(hidden).all()
    assert max_rel_error(hidden, ref.last_hidden_state) <= 0.05


@pytest.mark.parametrize("name", ["quick_gelu", "with_projection"])
def test_save_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, name):
    model = make_reference(tmp_path / "ref", name)
    module, params = load_text_encoder(tmp_path / "ref")
    save_text_encoder(module, params, tmp_path / "ours")
    module2, params2 = load_text_encoder(tmp_path / "ours")
    assert module2.config == module.config
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    reloaded = VARIANTS[name][0].from_pretrained(tmp_path / "ours").eval()
    ids, _ = example_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, reloaded(ids).last_hidden_state, rtol=0, atol=0)


def test_unknown_config_field(tmp_path):
    make_reference(tmp_path, "quick_gelu")
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_sise"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'hidden_sise'.*'hidden_size'"):
        load_text_encoder(tmp_path)


def test_tokenizer_pads_and_truncates_to_77(tmp_path):
    reference = write_tiny_tokenizer(tmp_path / "tokenizer")
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    prompts = ["a red circle", "red " * 100]
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert ids.shape == (2, 77)
    np.testing.assert_array_equal(ids, expected)
    red = tokenizer.convert_tokens_to_ids("red</w>")
    assert ids[0, 1] == tokenizer.convert_tokens_to_ids("a</w>") and ids[0, 2] == red
    assert ids[1, 0] == tokenizer.bos_token_id and ids[1, 76] == tokenizer.eos_token_id


def test_tokenizer_folder_without_vocabulary(tmp_path):
    write_tiny_tokenizer(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="neither vocab.json"):
        load_tokenizer(tmp_path / "tokenizer")
