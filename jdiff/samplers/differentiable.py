"""The sampling loop that reverse-mode autodiff can pass: gradients of the result with respect to
the starting noise, the conditioning and the model's parameters.

`run` (base.py) is a `fori_loop` with traced bounds, which lowers to a while loop: fast, but JAX
cannot take reverse-mode gradients through it. `run_differentiable` runs the same steps, in the same
operation order, as a `lax.scan` of a fixed (static) length `max_steps`, each iteration running its
step under `lax.cond` only while the plan has steps left, so the step count stays a traced value and
one compiled program serves every count up to `max_steps`.

- remat: each step is a `jax.checkpoint`, so the backward pass keeps only the latents (and a
  multistep sampler's state) between steps and recomputes a step's activations when it needs them:
  memory grows with the step count by one latent batch per step, not by the denoiser's activations.
- grad_steps=K (DRaFT-K, Clark et al. 2023): gradients flow through the last K steps only; the
  steps before them run in the fast loop on stopped values and cost no backward pass.

Everything the gradient should reach goes in `params` (weights, adapters, conditioning): the steps
before the last K see it through `stop_gradient`, and so see no tangents at all.
"""

import jax
import jax.numpy as jnp

from jdiff.errors import ConfigError
from jdiff.samplers.base import Plan, Sampler, keep_known


def check_max_steps(plan: Plan, max_steps: int, grad_steps=None) -> None:
    """A clear error on the host when a concrete plan runs more steps than the scan's length."""
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"max_steps must be a positive integer (static), got {max_steps!r}.")
    if grad_steps is not None and (not isinstance(grad_steps, int) or grad_steps < 1):
        raise ConfigError(f"grad_steps must be a positive integer (static) or None for every step, got {grad_steps!r}.")
    if grad_steps is None and not isinstance(plan.stop, jax.core.Tracer):
        steps = int(plan.stop) - int(plan.start)
        if steps > max_steps:
            raise ConfigError(f"the plan runs {steps} steps (loop iterations: PNDM makes more than its step count) "
                              f"but the differentiable loop is {max_steps} long: raise max_steps (a new length "
                              f"compiles once) or lower the step count.")


def run_differentiable(sampler: Sampler, model_fn, params, x, plan: Plan, keys=None, known=None, *,
                       max_steps: int, grad_steps: int | None = None, remat: bool = True):
    """The latents `run` returns, differentiably.

    model_fn(params, x, t, step) -> the denoiser's output (guidance included); `params` is every
    value the gradient should reach. max_steps: the scan's length (static; at least the plan's step
    count, which stays traced). grad_steps: backpropagate through the last K steps only (static);
    the scan is then K long and the steps before run in the fast loop. known: as `run`'s
    (inpainting with an ordinary model).
    """
    check_max_steps(plan, max_steps, grad_steps)
    plan = jax.tree.map(jnp.asarray, plan)  # numpy arrays cannot be indexed by the scan's traced step

    def one_step(params, i, carry):
        x, state = carry
        x, state = sampler.step(lambda x, t: model_fn(params, x, t, i), x, i, plan, state, keys)
        return keep_known(sampler, x, i, plan, known), state

    x = x.astype(jnp.float32)
    carry = (x, sampler.init_state(x))
    first = plan.start
    if grad_steps is not None:  # DRaFT-K: the steps before the last K run on stopped values, in the fast loop
        first = jnp.maximum(plan.stop - grad_steps, plan.start)
        frozen = jax.lax.stop_gradient
        stopped = jax.lax.fori_loop(plan.start, first, lambda i, c: one_step(frozen(params), i, c), frozen(carry))
        # with K or fewer steps in all nothing ran: keep the gradient to the starting latents
        carry = jax.tree.map(lambda ran, start: jnp.where(first > plan.start, ran, start), stopped, carry)

    def body(carry, j):
        i = first + j
        carry = jax.lax.cond(i < plan.stop, lambda c: one_step(params, i, c), lambda c: c, carry)
        return carry, None

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)  # inside a scan, CSE cannot undo the remat
    length = max_steps if grad_steps is None else grad_steps
    (x, _), _ = jax.lax.scan(body, carry, jnp.arange(length, dtype=jnp.int32))
    # a traced plan longer than the scan cannot raise: NaN latents say so rather than an unfinished image
    return jnp.where(plan.stop - first > length, jnp.nan, x)
