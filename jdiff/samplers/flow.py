"""Rectified flow (SD3, Flux): the model predicts a velocity and each step is an Euler step in sigma."""

import math

import jax.numpy as jnp
import numpy as np

from jdiff.samplers.base import Sampler


def _flow_levels(config, n, mu=None, sigmas=None):
    """FlowMatchEulerDiscreteScheduler.set_timesteps(n, sigmas=sigmas, mu=mu). sigmas: the levels a
    pipeline passes before shifting (Flux's linspace(1, 1/n, n)), None for the scheduler's own.
    mu: the dynamic shift (`schedules.flow_shift_mu`), needed when the config shifts dynamically."""
    t_count, shift = config.num_train_timesteps, config.shift
    if config.use_dynamic_shifting:
        if mu is None:
            raise ValueError("this scheduler shifts by the image size (use_dynamic_shifting): pass mu.")
        e = math.exp(mu) if config.time_shift_type == "exponential" else mu
        shifted = lambda s: e / (e + (1 / s - 1))
        sigma_min = float(np.float32(1.0 / t_count))  # unshifted: the shift comes with the image size
    else:
        shifted = lambda s: shift * s / (1 + (shift - 1) * s)
        sigma_min = float(np.float32(shifted(np.float32(1.0 / t_count))))  # the schedule's smallest level
    if sigmas is None:
        sigmas = np.linspace(1.0 * t_count, sigma_min * t_count, n) / t_count
    else:  # diffusers casts given levels to float32 before shifting them
        sigmas = np.asarray(sigmas).astype(np.float32)
        if len(sigmas) != n:
            raise ValueError(f"{len(sigmas)} sigmas given for {n} steps.")
    sigmas = shifted(sigmas).astype(np.float32)
    ts = sigmas * np.float32(t_count)
    return {"timesteps": ts, "sigmas": np.append(sigmas, 0.0).astype(np.float32)}, 1.0


def flow_noise(x0, noise, plan, i):
    sigma = plan.sigmas[i]
    return sigma * noise + (1.0 - sigma) * x0


def _flow_step(model_fn, x, i, plan, state, keys):
    velocity = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
    return x + (plan.sigmas[i + 1] - plan.sigmas[i]) * velocity, state


FLOW_EULER = Sampler("flow_euler", "FlowMatchEulerDiscreteScheduler", _flow_levels, _flow_step, flow_noise,
                     description="rectified flow, Euler (SD3, Flux)")
