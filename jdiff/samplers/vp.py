"""Samplers on the variance-preserving timesteps themselves (DDIM, DDPM, LCM): each step reads
alphas_cumprod at the current timestep and at the one it moves to."""

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import schedules
from jdiff.errors import ConfigError
from jdiff.samplers.base import Sampler, clip_x0, step_noise
from jdiff.schedules import predicted_eps, predicted_x0


def vp_arrays(config, ts, next_ts, final):
    """timesteps, alpha_bar at each and alpha_bar_next of the level each step moves to (`final`
    past the last training timestep)."""
    a = schedules.train_alphas_cumprod(config)
    a_next = np.where(next_ts >= 0, a[np.maximum(next_ts, 0)], np.float32(final))
    return {"timesteps": ts.astype(np.float32), "alpha_bar": a[ts], "alpha_bar_next": a_next.astype(np.float32)}


def _ddim_levels(config, n):
    ts = schedules.timesteps(n, config.num_train_timesteps, config.timestep_spacing, config.steps_offset)
    final = 1.0 if config.set_alpha_to_one else schedules.train_alphas_cumprod(config)[0]
    return vp_arrays(config, ts, ts - config.num_train_timesteps // n, final), 1.0


def _ddpm_levels(config, n):
    ts = schedules.timesteps(n, config.num_train_timesteps, config.timestep_spacing, config.steps_offset)
    return vp_arrays(config, ts, ts - config.num_train_timesteps // n, 1.0), 1.0


def _lcm_levels(config, n):
    original = config.original_inference_steps
    if not 1 <= n <= original <= config.num_train_timesteps:
        raise ConfigError(f"LCM takes 1..{original} steps (original_inference_steps), got {n}.")
    k = config.num_train_timesteps // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1]
    ts = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    return vp_arrays(config, ts, np.append(ts[1:], -1), 1.0), 1.0


def vp_noise(x0, noise, plan, i):
    a = plan.alpha_bar[i]
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def _ddim_step(model_fn, x, i, plan, state, keys):
    config = plan.config
    a, a_prev = plan.alpha_bar[i], plan.alpha_bar_next[i]
    out = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
    b = 1 - a
    x0 = clip_x0(predicted_x0(out, x, a**0.5, b**0.5, config.prediction_type), config)
    eps = predicted_eps(out, x, a**0.5, b**0.5, config.prediction_type)
    variance = ((1 - a_prev) / b) * (1 - a / a_prev)
    std = plan.eta * variance**0.5
    x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if keys is None:  # deterministic use without keys (eta must then be 0)
        return x, state
    # drawing noise costs a little every step: skip it when eta = 0 (the usual, deterministic case)
    x = jax.lax.cond(plan.eta > 0, lambda x: x + std * step_noise(keys, i, x), lambda x: x, x)
    return x, state


def _ddpm_step(model_fn, x, i, plan, state, keys):
    config = plan.config
    t, a, a_prev = plan.timesteps[i], plan.alpha_bar[i], plan.alpha_bar_next[i]
    out = model_fn(x, t).astype(jnp.float32)
    b, b_prev = 1 - a, 1 - a_prev
    alpha_t = a / a_prev
    beta_t = 1 - alpha_t
    x0 = clip_x0(predicted_x0(out, x, a**0.5, b**0.5, config.prediction_type), config)
    mean = (a_prev**0.5 * beta_t) / b * x0 + alpha_t**0.5 * b_prev / b * x
    if config.variance_type == "fixed_small":
        variance = jnp.maximum(b_prev / b * beta_t, 1e-20)
    else:
        variance = beta_t
    std = jnp.where(t > 0, variance**0.5, 0.0)
    return mean + std * step_noise(keys, i, x), state


def _lcm_step(model_fn, x, i, plan, state, keys):
    config = plan.config
    t, a, a_prev = plan.timesteps[i], plan.alpha_bar[i], plan.alpha_bar_next[i]
    out = model_fn(x, t).astype(jnp.float32)
    scaled_t = t * config.timestep_scaling
    c_skip = 0.5**2 / (scaled_t**2 + 0.5**2)
    c_out = scaled_t / (scaled_t**2 + 0.5**2) ** 0.5
    x0 = clip_x0(predicted_x0(out, x, jnp.sqrt(a), jnp.sqrt(1 - a), config.prediction_type), config)
    denoised = c_out * x0 + c_skip * x
    # the last step has a_prev = 1, which returns `denoised` itself
    return jnp.sqrt(a_prev) * denoised + jnp.sqrt(1 - a_prev) * step_noise(keys, i, x), state


DDIM = Sampler("ddim", "DDIMScheduler", _ddim_levels, _ddim_step, vp_noise,
               description="DDIM (eta > 0 adds noise)")
DDPM = Sampler("ddpm", "DDPMScheduler", _ddpm_levels, _ddpm_step, vp_noise, stochastic=True,
               description="DDPM ancestral sampling")
LCM = Sampler("lcm", "LCMScheduler", _lcm_levels, _lcm_step, vp_noise, stochastic=True,
              class_defaults={"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                              "clip_sample": False},
              description="latent consistency models (1-8 steps)")
