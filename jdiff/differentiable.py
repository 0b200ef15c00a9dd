"""Differentiable generation for research code: images as a pure function of the weights, the LoRA
adapters, the prompts' conditioning and the starting noise, that `jax.grad` passes.

    from jdiff import differentiable as dg

    tokens = dg.prompt_tokens(pipe, prompts, height=32, width=32)              # host
    empty = dg.prompt_tokens(pipe, [""] * len(prompts), height=32, width=32, negative=True)
    plan = dg.make_plan(pipe, steps=25, height=32, width=32)                   # host; a traced input
    noise = jax.random.normal(key, dg.latent_shape(pipe, len(prompts), 32, 32))

    def loss(params, noise):
        cond, negative = dg.conditioning(pipe, params, tokens), dg.conditioning(pipe, params, empty)
        images = dg.sample(pipe, params, cond, noise, plan, negative=negative, guidance=4.0,
                           max_steps=25, grad_steps=2)                         # DRaFT-2
        return -reward(images).mean()

    grads = jax.grad(loss)(pipe.params, noise)

`sample` runs the same steps as `jdiff.generate` (the same images to float rounding from the same
starting noise), through `samplers.sample_differentiable`: a scan of `max_steps` whatever the step
count (which stays a traced value of the plan), each step rematerialised, and with `grad_steps=K`
gradients through the last K steps only. Every argument is a pytree of arrays, so `sample` jits,
and shards as training does: put `params` with `sharding.tree_shardings` and the batch on the
batch axes, and XLA partitions the forward and backward passes alike.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import guidance as guidance_lib, lora, samplers
from jdiff.errors import ConfigError
from jdiff.families import Pipeline
from jdiff.models import vae_tiling as tiling
from jdiff.models.vae import unscale_latents
from jdiff.samplers.differentiable import check_max_steps


def prompt_tokens(pipe: Pipeline, prompts, *, height: int, width: int, negative: bool = False,
                  max_sequence_length: Optional[int] = None) -> dict:
    """The traced inputs of `conditioning` for `prompts` (host): token ids and, for families with
    non-text conditioning (SDXL's size ids), its diffusers defaults at height x width; negative=True
    gives the unconditional half's (SDXL: zeros where the checkpoint asks for them)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    family = pipe.family
    sequence = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    tokens = family.tokenize(pipe, prompts, **sequence)
    if family.extra_conditioning is not None:
        given = np.zeros(len(prompts), bool) if negative else np.ones(len(prompts), bool)
        extra, negative_extra = family.extra_conditioning(pipe, len(prompts), height, width, {}, given)
        tokens = {**tokens, **(negative_extra if negative else extra)}
    return tokens


def conditioning(pipe: Pipeline, params, tokens: dict, clip_skip: int = 0):
    """The denoiser's conditioning (a batch-major pytree) from `prompt_tokens`: differentiable in the
    text encoders' `params`; or give `sample` conditioning of your own (prompt-embedding gradients)."""
    return pipe.family.encode_prompts(dict(pipe.modules), params, tokens, clip_skip)


def make_plan(pipe: Pipeline, steps: int, *, height: int, width: int, sampler: Optional[str] = None,
              eta: float = 0.0) -> samplers.Plan:
    """The sampling plan (host) for `steps` steps of `sampler` (default: the checkpoint's own), as
    `jdiff.generate` makes it; a traced input of `sample` (a new step count compiles nothing)."""
    default_sampler = samplers.for_scheduler(pipe.scheduler.class_name, pipe.scheduler.config)
    sampler = sampler or default_sampler
    samplers.check_sampler(sampler, pipe.scheduler.class_name)
    family = pipe.family
    options = family.levels_options(pipe, steps, height, width) if family.levels_options else None
    return samplers.make_plan(sampler, pipe.scheduler.config, steps, eta=eta, explicit=pipe.scheduler.explicit,
                              levels_options=options)


def latent_shape(pipe: Pipeline, batch: int, height: int, width: int) -> tuple:
    f = pipe.vae_scale_factor
    if height % f or width % f:
        raise ConfigError(f"height and width must be multiples of {f}, got {height}x{width}.")
    return (batch, height // f, width // f, pipe.latent_channels)


def sample(pipe: Pipeline, params, cond, noise, plan: samplers.Plan, *, negative=None, guidance=1.0,
           guidance_rescale=0.0, true_cfg_scale=None, adapters=None, lora_scales=None, keys=None,
           max_steps: int, grad_steps: Optional[int] = None, remat: bool = True, decode: bool = True):
    """Images [B, H, W, 3] in [0, 1] (float32; or the final latents with decode=False) from the
    starting noise [B, h, w, C] (NHWC, before the sampler's initial scale, as generate's `latents=`).

    params: the pipeline's parameters by component (pipe.params, or a trained/perturbed copy).
    cond, negative: `conditioning` of the prompts and of the negative prompts; with `negative`,
      classifier-free guidance at `guidance` (a model that embeds its guidance scale, such as Flux-dev
      or LCM, takes `guidance` as an input and is guided by `true_cfg_scale` instead).
    adapters, lora_scales: LoRA adapters {name: tree} (default pipe.adapters) and their scales: a
      [B, n_adapters] array, columns in sorted name order, or generate()'s {name: scale} forms.
    keys: per-image PRNG keys [B] for the stochastic samplers.
    max_steps, grad_steps, remat: see samplers.sample_differentiable.
    Every array argument may be traced; only the pipeline, max_steps, grad_steps, remat and decode
    shape the program.
    """
    check_max_steps(plan, max_steps, grad_steps)
    family, modules = pipe.family, dict(pipe.modules)
    adapters = dict(pipe.adapters) if adapters is None else dict(adapters)
    batch = noise.shape[0]
    if adapters and (lora_scales is None or isinstance(lora_scales, (dict, list, tuple))):
        lora_scales = lora.scale_matrix(adapters, lora_scales, batch)
    embeds = family.embeds_guidance(modules)
    if embeds and negative is not None and true_cfg_scale is None:
        raise ConfigError(f"this {family.name} model embeds its guidance scale: with negative conditioning, set "
                          "true_cfg_scale (the classifier-free weight) as well.")
    cfg_scale = true_cfg_scale if embeds else guidance
    values = {"weights": params, "adapters": adapters, "lora_scales": lora_scales, "cond": cond, "negative": negative,
              "guidance": jnp.asarray(guidance, jnp.float32), "cfg_scale": jnp.asarray(cfg_scale or 1.0, jnp.float32),
              "rescale": jnp.asarray(guidance_rescale, jnp.float32)}

    def model_fn(values, x, t, step):
        adapted = lora.with_adapters(modules, values["adapters"], values["lora_scales"])
        denoise = family.denoiser(adapted, values["weights"], values["guidance"])
        if values["negative"] is None:
            return guidance_lib.unguided(denoise, values["cond"])(x, t)
        return guidance_lib.classifier_free_guidance(denoise, values["cond"], values["negative"],
                                                     values["cfg_scale"], values["rescale"])(x, t)

    x = samplers.initial_latents(jnp.asarray(noise, jnp.float32), plan)
    latents = samplers.sample_differentiable(model_fn, values, x, plan, keys, max_steps=max_steps,
                                             grad_steps=grad_steps, remat=remat)
    if not decode:
        return latents
    vae = modules["vae"]
    images = tiling.decode(vae, params["vae"], unscale_latents(vae.config, latents))
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def noise_from_seeds(pipe: Pipeline, seeds, height: int, width: int) -> jax.Array:
    """Starting noise [B, h, w, C], image b's drawn from seeds[b] as `jdiff.generate(seed=...)` draws it."""
    keys = jax.vmap(jax.random.fold_in, (0, None))(jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32)), 0)
    shape = latent_shape(pipe, 1, height, width)[1:]
    return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(keys)


def per_image_keys(seeds) -> jax.Array:
    """PRNG keys [B] for stochastic samplers, as generate() derives them from per-image seeds."""
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    return jax.vmap(jax.random.fold_in, (0, None))(keys, 1)
