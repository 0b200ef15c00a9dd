"""Optimising the starting noise of a generation for a differentiable reward, the model fixed (as
DOODL and ReNO do): gradients of the reward of the decoded pictures with respect to the noise,
through every sampling step (`jdiff.differentiable.sample`, rematerialised), and Adam on the noise.

    update = noise_optimisation.make_update(pipe, plan, reward_fn, guidance=4.0, learning_rate=0.05)
    state = update.init(noise)
    for _ in range(20):
        noise, state, rewards = update(noise, state, pipe.params, cond, negative, targets)

Each picture's noise gets exactly its own gradient (the loss is a sum over the batch, and Adam works
element by element), so a prompt's result does not depend on which others share its batch. A prior
keeps each noise a plausible Gaussian draw: without it the optimiser can push the noise far from
the norm the sampler expects and the pictures leave the model's distribution.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jdiff import differentiable as dg
from jdiff.families import Pipeline
from jdiff.samplers import Plan


def norm_prior(noise: jax.Array) -> jax.Array:
    """[B] penalties: (mean square - 1)^2 of each noise, zero at a standard Gaussian draw's norm."""
    return (jnp.mean(jnp.square(noise.astype(jnp.float32)), axis=tuple(range(1, noise.ndim))) - 1.0) ** 2


class NoiseUpdate(NamedTuple):
    """`init(noise)` gives the optimiser state; `__call__(noise, state, params, cond, negative,
    targets)` -> (noise, state, rewards [B] of the pictures before the update), jitted."""

    init: Callable
    step: Callable

    def __call__(self, noise, state, params, cond, negative, targets):
        return self.step(noise, state, params, cond, negative, targets)


def make_update(pipe: Pipeline, plan: Plan, reward_fn: Callable, *, guidance: float, learning_rate: float,
                prior_weight: float = 1.0, max_steps: int | None = None) -> NoiseUpdate:
    """One Adam step on the starting noise [B, h, w, C] of pictures sampled with `plan` (classifier-free
    guidance at `guidance` with `negative` conditioning, or none when it is None), maximising
    `reward_fn(images [B, H, W, 3] in [0, 1], targets) -> [B]` minus `prior_weight` times `norm_prior`.
    `max_steps` (default the plan's step count) is the scan length: plans of up to that many steps
    share one compiled program."""
    max_steps = int(plan.num_steps) if max_steps is None else int(max_steps)
    optimiser = optax.adam(learning_rate)

    def loss(noise, params, cond, negative, targets):
        images = dg.sample(pipe, params, cond, noise, plan, negative=negative, guidance=guidance, max_steps=max_steps)
        rewards = reward_fn(images, targets)
        return jnp.sum(prior_weight * norm_prior(noise) - rewards), rewards

    @jax.jit
    def step(noise, state, params, cond, negative, targets):
        (_, rewards), grad = jax.value_and_grad(loss, has_aux=True)(noise, params, cond, negative, targets)
        changes, state = optimiser.update(grad, state, noise)
        return optax.apply_updates(noise, changes), state, rewards

    return NoiseUpdate(optimiser.init, step)
