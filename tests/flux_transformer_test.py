"""The Flax Flux transformer against diffusers' FluxTransformer2DModel on small random weights:
schnell (no guidance embedding) and dev (guidance embedding), packed latents and rotary positions."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jdiff import convert
from jdiff.errors import ConfigError
from jdiff.models import flux_transformer as flux
from parity import max_rel_error, randomize_torch

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))


def torch_transformer(folder, seed=0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = randomize_torch(FluxTransformer2DModel(**{**TINY, **overrides}), seed=seed)
    model.save_pretrained(folder)
    return model


def inputs(seed, height=12, width=8, batch=2, tokens=7):
    """Packed latents of a height x width x 4 latent image, as the Flux pipeline makes them."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, height, width, TINY["in_channels"] // 4)).astype(np.float32)
    return dict(tokens=np.asarray(flux.pack(jnp.asarray(latents))), timestep=np.array([1.0, 0.37][:batch], np.float32),
                context=rng.standard_normal((batch, tokens, TINY["joint_attention_dim"])).astype(np.float32),
                pooled=rng.standard_normal((batch, TINY["pooled_projection_dim"])).astype(np.float32),
                img_ids=flux.image_ids(height, width), txt_ids=np.zeros((tokens, 3), np.float32), latents=latents)


def run_torch(model, a, guidance=None):
    with torch.no_grad():
        out = model(torch.tensor(a["tokens"]), torch.tensor(a["context"]), torch.tensor(a["pooled"]),
                    torch.tensor(a["timestep"]), torch.tensor(a["img_ids"]), torch.tensor(a["txt_ids"]),
                    guidance=None if guidance is None else torch.tensor(guidance)).sample
    return out.numpy()


def run_ours(module, params, a, guidance=None):
    return module.apply({"params": params}, jnp.asarray(a["tokens"]), jnp.asarray(a["timestep"]),
                        jnp.asarray(a["context"]), jnp.asarray(a["pooled"]), a["img_ids"], a["txt_ids"],
                        None if guidance is None else jnp.asarray(guidance))


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_matches_diffusers(tmp_path, variant):
    dev = variant == "dev"
    model = torch_transformer(tmp_path, guidance_embeds=dev)
    module, params = convert.load_flux_transformer(tmp_path)
    a = inputs(0)
    guidance = np.array([3.5, 1.0], np.float32) if dev else None
    assert max_rel_error(run_ours(module, params, a, guidance), run_torch(model, a, guidance)) < 1e-4
    # Traced ids (computed in float32 in the program) give the same result.
    traced = jax.jit(lambda p, i, t: module.apply({"params": p}, jnp.asarray(a["tokens"]), jnp.asarray(a["timestep"]),
                                                  jnp.asarray(a["context"]), jnp.asarray(a["pooled"]), i, t,
                                                  None if guidance is None else jnp.asarray(guidance)))
    assert max_rel_error(traced(params, a["img_ids"], a["txt_ids"]), run_torch(model, a, guidance)) < 1e-4


def test_packing_equals_diffusers():
    from diffusers import FluxPipeline

    a = inputs(1, height=6, width=10)
    latents = torch.tensor(a["latents"]).permute(0, 3, 1, 2)
    packed = FluxPipeline._pack_latents(latents, 2, 4, 6, 10).numpy()
    np.testing.assert_array_equal(a["tokens"], packed)
    expected_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(flux.image_ids(6, 10), expected_ids)
    np.testing.assert_array_equal(np.asarray(flux.unpack(jnp.asarray(a["tokens"]), 6, 10)), a["latents"])


def test_save_loads_in_diffusers_remat_and_bfloat16(tmp_path):
    from diffusers import FluxTransformer2DModel

    model = torch_transformer(tmp_path / "src", guidance_embeds=True)
    module, params = convert.load_flux_transformer(tmp_path / "src")
    convert.save_flux_transformer(module, params, tmp_path / "ours")
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "ours").eval()
    a, guidance = inputs(2), np.array([3.5, 2.0], np.float32)
    assert max_rel_error(run_torch(reloaded, a, guidance), run_torch(model, a, guidance)) < 1e-6
    remat, _ = convert.load_flux_transformer(tmp_path / "src", gradient_checkpointing=True)
    loss = lambda m: lambda p: jnp.mean(run_ours(m, p, a, guidance) ** 2)
    g1, g2 = jax.grad(loss(module))(params), jax.grad(loss(remat))(params)
    assert max(jax.tree.leaves(jax.tree.map(max_rel_error, g2, g1))) < 1e-5
    bf16, _ = convert.load_flux_transformer(tmp_path / "src", dtype=jnp.bfloat16)
    half = run_ours(bf16, params, a, guidance)
    assert half.dtype == jnp.bfloat16
    assert max_rel_error(half.astype(jnp.float32), run_ours(module, params, a, guidance)) < 0.05


def test_bad_configs_and_calls_are_named(tmp_path):
    torch_transformer(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ConfigError, match="axes_dims_rope"):
        flux.FluxTransformerConfig.from_dict({**config, "axes_dims_rope": [4, 4, 4]})
    with pytest.raises(ConfigError, match="patch_size"):
        flux.FluxTransformerConfig.from_dict({**config, "patch_size": 2})
    module, params = convert.load_flux_transformer(tmp_path)
    with pytest.raises(ValueError, match="no guidance embedding"):
        run_ours(module, params, inputs(3), np.ones((2,), np.float32))
