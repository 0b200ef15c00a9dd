"""Rectified flow (SD3, Flux): the model predicts a velocity and each step is an Euler step in sigma."""

import jax.numpy as jnp
import numpy as np

from jdiff.samplers.base import Sampler


def _flow_levels(config, n):
    t_count, shift = config.num_train_timesteps, config.shift
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)
    sigma_max = 1.0
    sigma_min = float(np.float32(shifted(np.float32(1.0 / t_count))))  # the schedule's smallest level
    sigmas = shifted(np.linspace(sigma_max * t_count, sigma_min * t_count, n) / t_count).astype(np.float32)
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
