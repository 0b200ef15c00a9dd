"""The Flax SD3 transformer (MMDiT) against diffusers' SD3Transformer2DModel on small random weights:
SD3 (no query/key norms), SD3.5 Large (RMS query/key norms) and SD3.5 Medium (plus the extra image
self-attention of `dual_attention_layers`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jdiff import convert
from jdiff.errors import CheckpointError, ConfigError
from jdiff.models import dit_layers, sd3_transformer
from parity import max_rel_error, nchw_to_nhwc, nhwc_to_nchw, randomize_torch

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=10)
VARIANTS = {
    "sd3": {},
    "sd3.5-large": dict(qk_norm="rms_norm"),
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}


def torch_transformer(folder, seed=0, **overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = randomize_torch(SD3Transformer2DModel(**{**TINY, **overrides}), seed=seed)
    model.save_pretrained(folder)
    return model


def inputs(seed, height=12, width=8, batch=2, tokens=7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, height, width, TINY["in_channels"])).astype(np.float32)
    t = np.array([1000.0, 312.5][:batch], np.float32)  # flow-matching timesteps: sigma * 1000
    context = rng.standard_normal((batch, tokens, TINY["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((batch, TINY["pooled_projection_dim"])).astype(np.float32)
    return x, t, context, pooled


def run_torch(model, x, t, context, pooled, **kwargs):
    with torch.no_grad():
        out = model(torch.tensor(nhwc_to_nchw(x)), torch.tensor(context), torch.tensor(pooled), torch.tensor(t),
                    **kwargs).sample
    return nchw_to_nhwc(out.numpy())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_diffusers(tmp_path, variant):
    model = torch_transformer(tmp_path, **VARIANTS[variant])
    module, params = convert.load_sd3_transformer(tmp_path)
    # A 12x8 latent is a 6x4 patch grid: positions come from an off-square crop of the 10x10 table.
    x, t, context, pooled = inputs(0)
    ours = jax.jit(module.apply)({"params": params}, *map(jnp.asarray, (x, t, context, pooled)))
    assert max_rel_error(ours, run_torch(model, x, t, context, pooled)) < 1e-4


def test_skip_layers_match_diffusers(tmp_path):
    """SD3.5's skip-layer guidance runs the transformer with some blocks left out."""
    model = torch_transformer(tmp_path, qk_norm="rms_norm")
    module, params = convert.load_sd3_transformer(tmp_path)
    x, t, context, pooled = inputs(1, height=8, width=8)
    ours = module.apply({"params": params}, *map(jnp.asarray, (x, t, context, pooled)), skip_layers=(1,))
    assert max_rel_error(ours, run_torch(model, x, t, context, pooled, skip_layers=[1])) < 1e-4
    whole = module.apply({"params": params}, *map(jnp.asarray, (x, t, context, pooled)))
    assert max_rel_error(ours, whole) > 1e-2


def test_position_table_equals_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for dim, grid, base in ((32, 10, 4), (1536, 192, 64)):  # the tiny model's; SD3.5 Large's
        expected = get_2d_sincos_pos_embed(dim, grid, base_size=base, output_type="pt").float().numpy()
        np.testing.assert_allclose(dit_layers.sincos_2d(dim, grid, base), expected, rtol=0, atol=1e-6)


def test_save_loads_in_diffusers_and_remat_and_bfloat16(tmp_path):
    from diffusers import SD3Transformer2DModel

    model = torch_transformer(tmp_path / "src", qk_norm="rms_norm", dual_attention_layers=(0,))
    module, params = convert.load_sd3_transformer(tmp_path / "src")
    convert.save_sd3_transformer(module, params, tmp_path / "ours")
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path / "ours").eval()
    x, t, context, pooled = inputs(2)
    assert max_rel_error(run_torch(reloaded, x, t, context, pooled), run_torch(model, x, t, context, pooled)) < 1e-6

    args = tuple(map(jnp.asarray, (x, t, context, pooled)))
    remat, _ = convert.load_sd3_transformer(tmp_path / "src", gradient_checkpointing=True)
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, *args) ** 2)
    g1, g2 = jax.grad(loss(module))(params), jax.grad(loss(remat))(params)
    assert max(jax.tree.leaves(jax.tree.map(max_rel_error, g2, g1))) < 1e-5
    bf16, _ = convert.load_sd3_transformer(tmp_path / "src", dtype=jnp.bfloat16)
    half = bf16.apply({"params": params}, *args)
    assert half.dtype == jnp.bfloat16
    assert max_rel_error(half.astype(jnp.float32), module.apply({"params": params}, *args)) < 0.05


def test_bad_configs_inputs_and_files_are_named(tmp_path):
    torch_transformer(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    bad = ((dict(qk_norm="layer_norm"), "qk_norm"), (dict(caption_projection_dim=24), "caption_projection_dim"),
           (dict(dual_attention_layers=[5]), "dual_attention_layers"),
           (dict(pos_embed_max_size=None), "pos_embed_max_size"))
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            sd3_transformer.SD3TransformerConfig.from_dict({**config, **change})
    module, params = convert.load_sd3_transformer(tmp_path)
    x, t, context, pooled = inputs(3, height=24, width=8)
    with pytest.raises(ValueError, match="12x4 patch grid.*10x10"):
        module.apply({"params": params}, *map(jnp.asarray, (x, t, context, pooled)))
    x, t, context, pooled = inputs(3, height=7, width=8)
    with pytest.raises(ValueError, match="2x2 patches"):
        module.apply({"params": params}, *map(jnp.asarray, (x, t, context, pooled)))
    (tmp_path / "config.json").write_text(json.dumps({**config, "sample_size": 16}))
    with pytest.raises(CheckpointError, match="pos_embed.pos_embed"):  # the stored table was made for size 8
        convert.load_sd3_transformer(tmp_path)


def test_half_precision_files_load(tmp_path):
    """Released SD3 weights are float16 (the position buffer too): they load, rounded as stored."""
    model = torch_transformer(tmp_path / "src").half()
    model.save_pretrained(tmp_path / "half")
    module, params = convert.load_sd3_transformer(tmp_path / "half")
    _, full = convert.load_sd3_transformer(tmp_path / "src")
    assert max(jax.tree.leaves(jax.tree.map(max_rel_error, params, full))) < 1e-3
