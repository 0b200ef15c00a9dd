"""Samplers in k-diffusion's scaling (x = x0 + sigma * eps, the model given x / sqrt(sigma^2 + 1)):
Euler and Euler ancestral, as diffusers' Euler schedulers run them."""

import jax.numpy as jnp
import numpy as np

from jdiff import schedules
from jdiff.samplers.base import Sampler, step_noise


def train_sigmas(config):
    a = schedules.train_alphas_cumprod(config)
    if config.rescale_betas_zero_snr:
        a = a.copy()
        a[-1] = 2**-24  # diffusers' guard: a zero terminal SNR would make sigma infinite
    return (((1 - a) / a) ** 0.5).astype(np.float32)


def euler_levels(config, n):
    """Timesteps and sigmas (with a final 0) of diffusers' k-diffusion schedulers (Euler, LMS, Heun)."""
    t_count = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, t_count - 1, n, dtype=np.float32)[::-1].copy()
    else:
        ts = schedules.timesteps(n, t_count, config.timestep_spacing, config.steps_offset).astype(np.float32)
    train = train_sigmas(config)
    sigmas = np.interp(ts, np.arange(len(train)), train)
    if config.use_karras_sigmas:
        sigmas = schedules.karras_sigmas(sigmas[-1], sigmas[0], n)
        ts = schedules.sigma_to_timestep(sigmas, train)
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    max_sigma = float(sigmas.max())
    init = max_sigma if config.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
    return {"timesteps": ts.astype(np.float32), "sigmas": sigmas}, init


def k_x0(out, x, sigma, config):
    """Clean-sample estimate in k-diffusion's scaling (x = x0 + sigma * eps), diffusers' Euler order."""
    if config.prediction_type == "epsilon":
        return x - sigma * out
    if config.prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    return out


def k_noise(x0, noise, plan, i):
    return x0 + noise * plan.sigmas[i]


def _euler_step(model_fn, x, i, plan, state, keys):
    sigma = plan.sigmas[i]
    out = model_fn(x / ((sigma**2 + 1) ** 0.5), plan.timesteps[i]).astype(jnp.float32)
    derivative = (x - k_x0(out, x, sigma, plan.config)) / sigma
    return x + derivative * (plan.sigmas[i + 1] - sigma), state


def _euler_ancestral_step(model_fn, x, i, plan, state, keys):
    sigma, sigma_to = plan.sigmas[i], plan.sigmas[i + 1]
    out = model_fn(x / ((sigma**2 + 1) ** 0.5), plan.timesteps[i]).astype(jnp.float32)
    sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    derivative = (x - k_x0(out, x, sigma, plan.config)) / sigma
    x = x + derivative * (sigma_down - sigma)
    return x + step_noise(keys, i, x) * sigma_up, state


EULER = Sampler("euler", "EulerDiscreteScheduler", euler_levels, _euler_step, k_noise,
                class_defaults={"timestep_spacing": "linspace"}, description="Euler (Karras sigmas if configured)")
EULER_ANCESTRAL = Sampler("euler_a", "EulerAncestralDiscreteScheduler", euler_levels, _euler_ancestral_step,
                          k_noise, class_defaults={"timestep_spacing": "linspace"}, stochastic=True,
                          description="Euler ancestral")
