"""AutoencoderKL parity with diffusers on random weights, for every supported option."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from jdiff.convert import load_vae, save_vae
from jdiff.errors import ConfigError
from jdiff.models import vae
from parity import max_rel_error, nchw_to_nhwc, nhwc_to_nchw, randomize_torch

TWO_BLOCKS = dict(
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
)
CONFIGS = {
    "sd": dict(TWO_BLOCKS),
    # Three levels, deeper blocks, 16 groups, a non-SiLU resnet activation (the output act stays SiLU).
    "deep_mish": dict(
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=16, act_fn="mish",
    ),
    # SD3/Flux shape: 16 latent channels, no quant convs, shifted latents; other image channels.
    "sd3": dict(TWO_BLOCKS, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.0609, scaling_factor=1.5305, in_channels=4, out_channels=2),
    "mid_without_attention": dict(TWO_BLOCKS, mid_block_add_attention=False, layers_per_block=2),
}


def make_reference(folder, name, **overrides):
    config = {**CONFIGS[name], **overrides}
    torch.manual_seed(0)
    model = randomize_torch(TorchVAE(**config))
    model.save_pretrained(folder)
    return model, config


def reference_inputs(config, size=32, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, config.get("in_channels", 3), size, size, generator=gen) * 2 - 1
    down = 2 ** (len(config["block_out_channels"]) - 1)
    z = torch.randn(batch, config.get("latent_channels", 4), size // down, size // down, generator=gen)
    return x, z


def run_both(model, config, folder, dtype=jnp.float32):
    """(ours, reference) for the posterior mean, logvar, a decode, and the full forward pass."""
    x, z = reference_inputs(config)
    with torch.no_grad():
        post = model.encode(x).latent_dist
        ref = [post.mean, post.logvar, model.decode(z).sample, model(x).sample]
    module, params = load_vae(folder, dtype=dtype)
    apply = lambda method: jax.jit(lambda p, a: module.apply({"params": p}, a, method=method))
    posterior = apply("encode")(params, nchw_to_nhwc(x))
    ours = [posterior.mean, posterior.logvar, apply("decode")(params, nchw_to_nhwc(z)),
            apply("__call__")(params, nchw_to_nhwc(x))]
    return [np.asarray(o, np.float32) for o in ours], [nchw_to_nhwc(r) for r in ref]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers_float32(tmp_path, name):
    model, config = make_reference(tmp_path, name)
    ours, ref = run_both(model, config, tmp_path)
    for what, o, r in zip(("mean", "logvar", "decode", "forward"), ours, ref):
        assert max_rel_error(o, r) <= 1e-4, what


def test_bfloat16_compute_stays_close(tmp_path):
    model, config = make_reference(tmp_path, "sd")
    ours, ref = run_both(model, config, tmp_path, dtype=jnp.bfloat16)
    for what, o, r in zip(("mean", "logvar", "decode", "forward"), ours, ref):
        assert np.isfinite(o).all(), what
        assert max_rel_error(o, r) <= 0.05, what


def test_save_round_trip_is_bit_exact_and_loads_in_diffusers(tmp_path):
    model, config = make_reference(tmp_path / "ref", "sd3")
    module, params = load_vae(tmp_path / "ref")
    save_vae(module, params, tmp_path / "ours")
    module2, params2 = load_vae(tmp_path / "ours")
    assert module2.config == module.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, params2)

    reloaded = TorchVAE.from_pretrained(tmp_path / "ours").eval()
    assert reloaded.config.shift_factor == config["shift_factor"]
    x, _ = reference_inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(model(x).sample, reloaded(x).sample, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_values_and_gradients(tmp_path):
    make_reference(tmp_path, "sd")
    x = nchw_to_nhwc(reference_inputs(CONFIGS["sd"], size=16)[0])
    results = []
    for remat in (False, True):
        module, params = load_vae(tmp_path, gradient_checkpointing=remat)
        loss = lambda p: jnp.mean(module.apply({"params": p}, x) ** 2)
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_jitted_encode_sample_decode(tmp_path):
    make_reference(tmp_path, "sd")
    module, params = load_vae(tmp_path)
    x = nchw_to_nhwc(reference_inputs(CONFIGS["sd"])[0])

    @jax.jit
    def roundtrip(params, x, rng):
        posterior = module.apply({"params": params}, x, method=module.encode)
        z = vae.scale_latents(module.config, posterior.sample(rng))
        return posterior, module.apply({"params": params}, vae.unscale_latents(module.config, z),
                                       method=module.decode)

    posterior, images = roundtrip(params, x, jax.random.key(1))
    assert isinstance(posterior, vae.DiagonalGaussian)
    assert posterior.mean.shape == (2, 16, 16, 4) and images.shape == x.shape
    # __call__ samples with an explicit key, or else draws one from the "sample" RNG stream.
    call = jax.jit(lambda p, x, r: module.apply({"params": p}, x, True, rng=r))
    a, b = call(params, x, jax.random.key(1)), call(params, x, jax.random.key(2))
    np.testing.assert_allclose(a, images, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a, b)
    stream = lambda seed: module.apply({"params": params}, x, sample_posterior=True,
                                       rngs={"sample": jax.random.key(seed)})
    np.testing.assert_array_equal(stream(3), stream(3))
    assert not np.allclose(stream(3), stream(4))


def test_standardized_latents_change_only_the_latent_coordinates(tmp_path):
    make_reference(tmp_path / "ref", "sd")
    module, params = load_vae(tmp_path / "ref")
    x = nchw_to_nhwc(reference_inputs(CONFIGS["sd"], batch=4)[0])
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
    before = encode(params, x)
    mean, std = before.mean.mean(axis=(0, 1, 2)), before.mean.std(axis=(0, 1, 2))
    config, standard = vae.standardize_latents(module.config, params, mean, std)
    assert config.scaling_factor == 1.0 and config.shift_factor is None
    after = encode(standard, x)
    np.testing.assert_allclose(after.mean.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(after.mean.std(axis=(0, 1, 2)), 1.0, rtol=1e-5)
    # The same posterior in new coordinates: z' = (z - mean) / std for every sample z.
    np.testing.assert_allclose(after.mean, (before.mean - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jnp.exp(0.5 * after.logvar), jnp.exp(0.5 * before.logvar) / std, rtol=1e-4)
    z = after.sample(jax.random.key(0))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))
    np.testing.assert_allclose(decode(standard, z), decode(params, z * std + mean), rtol=1e-4, atol=1e-5)
    # Plain weights: diffusers loads them and decodes the standardized latents the same way.
    save_vae(module.clone(config=config), standard, tmp_path / "standard")
    reference = TorchVAE.from_pretrained(tmp_path / "standard").eval()
    assert reference.config.scaling_factor == 1.0
    with torch.no_grad():
        ours = np.asarray(decode(standard, z))
        theirs = nchw_to_nhwc(reference.decode(torch.from_numpy(nhwc_to_nchw(np.asarray(z)).copy())).sample)
    assert max_rel_error(ours, theirs) < 1e-4
    with pytest.raises(ConfigError, match="positive stds"):
        vae.standardize_latents(module.config, params, mean, -std)
    with pytest.raises(ConfigError, match="quant_conv"):
        vae.standardize_latents(vae.VAEConfig(use_quant_conv=False), params, mean, std)


def test_scale_latents_follows_the_pipelines():
    config = vae.VAEConfig(shift_factor=0.5, scaling_factor=2.0)
    z = jnp.arange(4.0)
    np.testing.assert_allclose(vae.scale_latents(config, z), (z - 0.5) * 2.0)
    np.testing.assert_allclose(vae.unscale_latents(config, vae.scale_latents(config, z)), z)
    plain = vae.VAEConfig()  # shift_factor None means no shift; SD's 0.18215 scale
    np.testing.assert_allclose(vae.scale_latents(plain, z), z * 0.18215, rtol=1e-6)


def test_diagonal_gaussian_matches_diffusers():
    gen = torch.Generator().manual_seed(0)
    moments = torch.randn(2, 8, 3, 5, generator=gen) * 3
    moments[0, 4, 0, 0], moments[1, 5, 1, 1] = -45.0, 27.0  # outside logvar's clip range
    other_moments = torch.randn(2, 8, 3, 5, generator=gen)
    x = torch.randn(2, 4, 3, 5, generator=gen)
    ref, ref_other = DiagonalGaussianDistribution(moments), DiagonalGaussianDistribution(other_moments)
    ours = vae.DiagonalGaussian.from_moments(jnp.asarray(nchw_to_nhwc(moments)))
    other = vae.DiagonalGaussian.from_moments(jnp.asarray(nchw_to_nhwc(other_moments)))
    for got, want in ((ours.mean, ref.mean), (ours.logvar, ref.logvar), (ours.std, ref.std),
                      (ours.var, ref.var), (ours.mode(), ref.mode())):
        np.testing.assert_allclose(nhwc_to_nchw(got), want, rtol=1e-6)
    np.testing.assert_allclose(ours.kl(), ref.kl(), rtol=1e-5)
    np.testing.assert_allclose(ours.kl(other), ref.kl(ref_other), rtol=1e-5)
    np.testing.assert_allclose(ours.nll(jnp.asarray(nchw_to_nhwc(x))), ref.nll(x), rtol=1e-5)


def test_diagonal_gaussian_sample_statistics():
    rng_mean, rng_sample = jax.random.split(jax.random.key(0))
    mean = jax.random.normal(rng_mean, (1, 2, 2, 3))
    logvar = jnp.linspace(-3.0, 1.0, 12).reshape(1, 2, 2, 3)
    n = 20000
    dist = vae.DiagonalGaussian(jnp.broadcast_to(mean, (n, 2, 2, 3)), jnp.broadcast_to(logvar, (n, 2, 2, 3)))
    samples = dist.sample(rng_sample)
    std = np.exp(0.5 * np.asarray(logvar[0]))
    np.testing.assert_allclose(samples.mean(0), mean[0], atol=4 * std.max() / n**0.5)
    np.testing.assert_allclose(samples.std(0), std, rtol=0.03)


def test_config_round_trip_and_errors(tmp_path):
    make_reference(tmp_path, "sd3")
    raw = json.loads((tmp_path / "config.json").read_text())
    config = vae.VAEConfig.from_dict(raw, "vae")
    assert config.down_block_types == ("DownEncoderBlock2D",) * 2 and config.latents_mean is None
    assert vae.VAEConfig.from_dict(config.to_dict(), "again") == config
    assert vae.VAEConfig.from_dict({"latents_mean": [0.1] * 4, "latents_std": [1.0] * 4}, "x").latents_mean == (0.1,) * 4
    bad = {
        "down_block_types": ["AttnDownEncoderBlock2D"] * 2,  # an architecture jdiff does not build
        "up_block_types": ["UpDecoderBlock2D"],  # one up block for two levels
        "norm_num_groups": 6,  # 32 channels do not split into 6 groups
        "act_fn": "tanh",
        "latents_std": [1.0] * 3,
        "layers_per_block": 0,
        "no_such_field": 1,
    }
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=key if key != "act_fn" else "activation"):
            vae.VAEConfig.from_dict({**raw, key: value}, "vae")


def test_legacy_attention_names_load(tmp_path):
    """Pre-0.14 diffusers VAEs call the mid attention query/key/value/proj_attn, as 1x1 convs or linears."""
    model, config = make_reference(tmp_path / "new", "sd")
    state = safetensors.numpy.load_file(str(tmp_path / "new" / "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"mid_block.attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        legacy[key] = value
    (tmp_path / "old").mkdir()
    shutil.copy(tmp_path / "new" / "config.json", tmp_path / "old" / "config.json")
    safetensors.numpy.save_file(legacy, str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"))
    _, new_params = load_vae(tmp_path / "new")
    _, old_params = load_vae(tmp_path / "old")
    jax.tree.map(np.testing.assert_array_equal, new_params, old_params)
