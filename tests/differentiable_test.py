"""Differentiable sampling (jdiff.differentiable, samplers/differentiable.py): the same images as
generate(), gradients that agree with finite differences, DRaFT-K truncation, LoRA and sharded
gradients, one program for every step count, and compiled memory that stays flat with remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import differentiable as dg, samplers, sharding
from jdiff.errors import ConfigError

PROMPTS = ["a red circle", "a blue square at the top"]
SIZE = 32


@pytest.fixture(scope="module")
def pipe(tiny_sd_folder):
    return jdiff.load_pipeline(tiny_sd_folder)


@pytest.fixture(scope="module")
def inputs(pipe):
    tokens = dg.prompt_tokens(pipe, PROMPTS, height=SIZE, width=SIZE)
    empty = dg.prompt_tokens(pipe, [""] * len(PROMPTS), height=SIZE, width=SIZE, negative=True)
    noise = jax.random.normal(jax.random.key(3), dg.latent_shape(pipe, len(PROMPTS), SIZE, SIZE))
    return tokens, empty, noise


def _guided(pipe, inputs, params=None, **kw):
    params = pipe.params if params is None else params
    tokens, empty, noise = inputs
    cond, negative = dg.conditioning(pipe, params, tokens), dg.conditioning(pipe, params, empty)
    return cond, negative


@pytest.mark.parametrize("sampler", ["dpm++2m", "euler_a", "pndm"])
def test_the_same_images_as_generate(pipe, inputs, sampler):
    tokens, empty, noise = inputs
    plan = dg.make_plan(pipe, 5, height=SIZE, width=SIZE, sampler=sampler)
    expected = jdiff.generate(pipe, PROMPTS, sampler=sampler, steps=5, guidance=3.0, latents=np.asarray(noise),
                              seed=[11, 12])
    cond, negative = _guided(pipe, inputs)
    keys = dg.per_image_keys([11, 12])
    run = jax.jit(lambda plan, grad_steps=None: dg.sample(pipe, pipe.params, cond, noise, plan, negative=negative,
                                                          guidance=3.0, keys=keys, max_steps=14,
                                                          grad_steps=grad_steps), static_argnames="grad_steps")
    np.testing.assert_allclose(np.asarray(run(plan)), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(run(plan, grad_steps=2)), expected, atol=1e-5)  # DRaFT's forward too


def test_one_program_for_every_step_count(pipe, inputs):
    tokens, _, noise = inputs
    traces = []

    @jax.jit
    def loss(params, noise, plan):
        traces.append(1)
        return dg.sample(pipe, params, dg.conditioning(pipe, params, tokens), noise, plan, max_steps=8).mean()

    for steps in (2, 5, 8):
        assert np.isfinite(float(loss(pipe.params, noise, dg.make_plan(pipe, steps, height=SIZE, width=SIZE))))
    assert len(traces) == 1
    too_long = dg.make_plan(pipe, 9, height=SIZE, width=SIZE)
    assert np.isnan(float(loss(pipe.params, noise, too_long)))  # traced: it cannot raise, and does not truncate
    with pytest.raises(ConfigError, match="9 steps .* but the differentiable loop is 8 long"):
        dg.sample(pipe, pipe.params, None, noise, too_long, max_steps=8)


def _directional_check(f, x, direction, eps, rtol):
    """jax.grad's derivative of scalar f at x along `direction` against central differences."""
    grad = jax.grad(f)(x)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    shift = lambda s: jax.tree.map(lambda a, d: a + s * d, x, direction)
    numeric = (float(f(shift(eps))) - float(f(shift(-eps)))) / (2 * eps)
    assert abs(analytic - numeric) <= rtol * abs(numeric), (analytic, numeric)
    assert abs(numeric) > 1e-3  # the direction moves the loss: not a vacuous agreement


def _random_like(tree, seed, scale=1.0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, jnp.shape(a), jnp.float32) for k, a in zip(keys, leaves)])


def test_gradients_agree_with_finite_differences(pipe, inputs):
    """Through four DPM-Solver++ steps with guidance and the VAE decoder: noise, prompt embeddings,
    U-Net weights and text encoder weights."""
    tokens, empty, noise = inputs
    plan = dg.make_plan(pipe, 4, height=SIZE, width=SIZE, sampler="dpm++2m")
    weight = jax.random.normal(jax.random.key(9), (len(PROMPTS), SIZE, SIZE, 3))
    negative = dg.conditioning(pipe, pipe.params, empty)

    def images(params, cond, noise):
        return dg.sample(pipe, params, cond, noise, plan, negative=negative, guidance=2.0, max_steps=4, decode=True)

    def loss(params, cond, noise):  # a smooth reward of the pictures (decoded, as rewards see them)
        return jnp.sum(weight * images(params, cond, noise))

    cond = dg.conditioning(pipe, pipe.params, tokens)
    f_noise = jax.jit(lambda n: loss(pipe.params, cond, n))
    _directional_check(f_noise, noise, _random_like(noise, 1), eps=1e-2, rtol=2e-2)
    f_cond = jax.jit(lambda c: loss(pipe.params, c, noise))
    _directional_check(f_cond, cond, _random_like(cond, 2), eps=1e-2, rtol=2e-2)
    f_unet = jax.jit(lambda u: loss({**pipe.params, "unet": u}, cond, noise))
    _directional_check(f_unet, pipe.params["unet"], _random_like(pipe.params["unet"], 3, 0.05), eps=1e-2, rtol=2e-2)
    f_text = jax.jit(lambda t: loss({**pipe.params, "text_encoder": t},
                                    dg.conditioning(pipe, {**pipe.params, "text_encoder": t}, tokens), noise))
    _directional_check(f_text, pipe.params["text_encoder"], _random_like(pipe.params["text_encoder"], 4, 0.05),
                       eps=1e-2, rtol=2e-2)


def test_draft_k_backpropagates_through_the_last_k_steps_only(pipe, inputs):
    """grad_steps=K equals running the first N - K steps as constants and differentiating the rest
    (DDIM, which carries nothing between steps), and gives the starting noise no gradient."""
    tokens, _, noise = inputs
    n, k = 6, 2
    plan = dg.make_plan(pipe, n, height=SIZE, width=SIZE, sampler="ddim")
    weight = jax.random.normal(jax.random.key(5), dg.latent_shape(pipe, len(PROMPTS), SIZE, SIZE))

    def loss(unet, noise, plan, grad_steps):
        params = {**pipe.params, "unet": unet}
        latents = dg.sample(pipe, params, dg.conditioning(pipe, pipe.params, tokens), noise, plan, max_steps=n,
                            grad_steps=grad_steps, decode=False)
        return jnp.sum(weight * latents)

    draft = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnames="grad_steps")
    unet_grad, noise_grad = draft(pipe.params["unet"], noise, plan, grad_steps=k)
    assert float(jnp.abs(noise_grad).max()) == 0.0

    # the same by hand: the first n - k steps' latents as a constant start of the last k
    prefix = plan.replace(stop=np.int32(n - k))
    middle = dg.sample(pipe, pipe.params, dg.conditioning(pipe, pipe.params, tokens), noise, prefix,
                       max_steps=n, decode=False)
    rest = plan.replace(start=np.int32(n - k))
    cond = dg.conditioning(pipe, pipe.params, tokens)

    def by_hand(unet):
        model = lambda values, x, t, step: pipe.family.denoiser(pipe.modules, {**pipe.params, "unet": values}, None)(
            x, t, cond)
        return jnp.sum(weight * samplers.sample_differentiable(model, unet, middle, rest, max_steps=k))

    expected = jax.jit(jax.grad(by_hand))(pipe.params["unet"])
    for got, want in zip(jax.tree.leaves(unet_grad), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    # K at least the step count: the full gradient, the noise's included
    full = draft(pipe.params["unet"], noise, plan, grad_steps=n)
    everything = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnames="grad_steps")(pipe.params["unet"], noise,
                                                                                          plan, None)
    for got, want in zip(jax.tree.leaves(full), jax.tree.leaves(everything)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    assert float(jnp.abs(full[1]).max()) > 0


def test_lora_parameters_get_gradients(pipe, inputs, tmp_path, tiny_sd_folder):
    from tiny_models import write_random_lora

    write_random_lora(tiny_sd_folder, tmp_path / "lora", seed=21)
    adapted = jdiff.load_lora_weights(pipe, tmp_path / "lora", adapter_name="style")
    tokens, _, noise = inputs
    plan = dg.make_plan(pipe, 3, height=SIZE, width=SIZE)
    cond = dg.conditioning(pipe, pipe.params, tokens)  # the text encoder's adapters are left out here
    weight = jax.random.normal(jax.random.key(6), dg.latent_shape(pipe, len(PROMPTS), SIZE, SIZE))
    unet_only = {"style": {"unet": adapted.adapters["style"]["unet"]}}

    def loss(adapters):  # on the latents: the clip of decoded pixels puts kinks in finite differences
        return jnp.sum(weight * dg.sample(adapted, adapted.params, cond, noise, plan, adapters=adapters,
                                          lora_scales={"style": 0.8}, max_steps=3, decode=False))

    # the down and up matrices (alpha, a fixed setting, stays put)
    direction = jax.tree_util.tree_map_with_path(
        lambda path, d: d * (path[-1].key != "alpha"), _random_like(unet_only, 7, 0.1))
    _directional_check(jax.jit(loss), unet_only, direction, eps=1e-2, rtol=2e-2)
    # scale 0 switches the adapter off: the base model's images
    off = dg.sample(adapted, adapted.params, cond, noise, plan, adapters=unet_only, lora_scales={"style": 0.0},
                    max_steps=3)
    base = dg.sample(pipe, pipe.params, cond, noise, plan, max_steps=3)
    np.testing.assert_allclose(off, base, atol=1e-6)


def test_sharded_gradients_equal_the_unsharded_ones(pipe):
    """Parameters sharded over fsdp (as training shards them) and the batch over data x fsdp."""
    prompts = PROMPTS * 4
    tokens = dg.prompt_tokens(pipe, prompts, height=SIZE, width=SIZE)
    noise = jax.random.normal(jax.random.key(4), dg.latent_shape(pipe, len(prompts), SIZE, SIZE))
    plan = dg.make_plan(pipe, 3, height=SIZE, width=SIZE)

    def loss(params, noise):
        images = dg.sample(pipe, params, dg.conditioning(pipe, params, tokens), noise, plan, max_steps=3)
        return jnp.mean(images ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    expected = grad(pipe.params, noise)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    params = sharding.put(pipe.params, sharding.tree_shardings(pipe.params, mesh))
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(params))
    got = grad(params, sharding.put(np.asarray(noise), sharding.batch_sharding(mesh)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(jnp.abs(b).max()) + 1e-9)


def _backward_temp_bytes(pipe, tokens, steps, remat):
    noise = jax.ShapeDtypeStruct(dg.latent_shape(pipe, len(PROMPTS), SIZE, SIZE), jnp.float32)
    plan = dg.make_plan(pipe, steps, height=SIZE, width=SIZE)

    def loss(unet, noise, plan):
        params = {**pipe.params, "unet": unet}
        return dg.sample(pipe, params, dg.conditioning(pipe, params, tokens), noise, plan, max_steps=steps,
                         remat=remat).mean()

    compiled = jax.jit(jax.grad(loss)).lower(pipe.params["unet"], noise, plan).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_memory_stays_flat_with_remat(pipe, inputs):
    tokens = inputs[0]
    latent_bytes = int(np.prod(dg.latent_shape(pipe, len(PROMPTS), SIZE, SIZE))) * 4
    remat = {steps: _backward_temp_bytes(pipe, tokens, steps, True) for steps in (4, 16)}
    plain = {steps: _backward_temp_bytes(pipe, tokens, steps, False) for steps in (4, 16)}
    # with remat, 12 more steps keep a few latent batches each (latents, the x0 estimate); without,
    # every step's activations
    assert remat[16] - remat[4] <= 12 * 8 * latent_bytes, (remat, latent_bytes)
    assert plain[16] - plain[4] > 4 * (remat[16] - remat[4] + latent_bytes), (plain, remat)
