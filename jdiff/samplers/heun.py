"""Heun's method as diffusers' HeunDiscreteScheduler runs it, in k-diffusion's scaling: an Euler
step to the next sigma, then the model again there and the step redone with the mean slope.

diffusers interleaves the two calls in one timestep list (t0, t1, t1, t2, t2, ...) and advances
one call per `step`; here one loop iteration is one whole step with both calls, in the same order.
The last step lands on sigma = 0, where diffusers' list ends after the Euler part: a plain Euler
step with a single model call.
"""

import jax
import jax.numpy as jnp

from jdiff.samplers.base import Sampler, clip_x0
from jdiff.samplers.karras import euler_levels, k_noise, k_x0


def _slope(model_fn, x, sigma, t, config):
    """dx/dsigma at (x, sigma) from the model's output at timestep t."""
    out = model_fn(x / ((sigma**2 + 1) ** 0.5), t).astype(jnp.float32)
    return (x - clip_x0(k_x0(out, x, sigma, config), config)) / sigma


def _heun_step(model_fn, x, i, plan, state, keys):
    config = plan.config
    sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
    slope = _slope(model_fn, x, sigma, plan.timesteps[i], config)
    dt = sigma_next - sigma
    euler = x + slope * dt

    def corrected(_):
        slope_next = _slope(model_fn, euler, sigma_next, plan.timesteps[i + 1], config)
        return x + (slope + slope_next) / 2 * dt

    # only the last step reaches sigma = 0 (where the second call would divide by zero)
    return jax.lax.cond(i + 1 < plan.num_steps, corrected, lambda _: euler, None), state


HEUN = Sampler("heun", "HeunDiscreteScheduler", euler_levels, _heun_step, k_noise,
               class_defaults={"beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                               "timestep_spacing": "linspace"},
               forced={"rescale_betas_zero_snr": False},  # not a HeunDiscreteScheduler setting: ignored as diffusers does
               description="Heun, 2nd order: two model calls per step (Karras sigmas if configured)")
