"""DPM-Solver++ (2M) as diffusers' DPMSolverMultistepScheduler runs it: the model output is turned
into an x0 estimate and a second-order multistep update uses the previous step's estimate."""

import jax.numpy as jnp
import numpy as np

from jdiff import schedules
from jdiff.samplers.base import Sampler, vp
from jdiff.samplers.karras import train_sigmas
from jdiff.schedules import predicted_x0


def dpm_timesteps(config, n):
    """DPM-Solver's own spacing: n + 1 points with the last dropped (diffusers' multistep schedulers)."""
    t_count = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, t_count - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = t_count // (n + 1)
        return (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    return np.arange(t_count, 0, -t_count / n).round().astype(np.int64) - 1


def dpm_levels(config, n):
    ts = dpm_timesteps(config, n)
    train = train_sigmas(config)
    if config.use_karras_sigmas:
        sigmas = schedules.karras_sigmas(train[0], train[-1], n)
        ts = schedules.sigma_to_timestep(sigmas, train)
        if config.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
        ts = ts.astype(np.int64)
    else:
        sigmas = np.interp(ts, np.arange(len(train)), train)
    last = train[0] if config.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.append(sigmas, last).astype(np.float32)
    return {"timesteps": ts.astype(np.float32), "sigmas": sigmas}, 1.0


def dpm_noise(x0, noise, plan, i):
    alpha, sigma = vp(plan.sigmas[i])
    return alpha * x0 + sigma * noise


def multistep_levels(plan, i):
    """(alpha_s0, sigma_s0), (alpha_t, sigma_t) of step i and the one it moves to, and the log-SNR
    steps h (this step) and h_0 (the previous one) that the 2M updates weigh."""
    alpha_s0, sigma_s0 = vp(plan.sigmas[i])
    alpha_t, sigma_t = vp(plan.sigmas[i + 1])
    alpha_s1, sigma_s1 = vp(plan.sigmas[jnp.maximum(i - 1, 0)])
    lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
    lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
    lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
    return (alpha_s0, sigma_s0), (alpha_t, sigma_t), lambda_t - lambda_s0, lambda_s0 - lambda_s1


def _dpm_step(model_fn, x, i, plan, previous_x0, keys):
    """DPM-Solver++ (2M): a second-order multistep update on the previous step's x0 estimate."""
    config = plan.config
    (alpha_s0, sigma_s0), (alpha_t, sigma_t), h, h_0 = multistep_levels(plan, i)
    out = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
    x0 = predicted_x0(out, x, alpha_s0, sigma_s0, config.prediction_type)
    first = (sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * x0
    first_order = use_first_order(i, plan)
    # where the step is first order h_0 / h may be 0 or infinite: an unused value, but its infinite
    # derivative would turn the gradient through the other branch of the `where` into NaN
    d1 = (1.0 / jnp.where(first_order, 1.0, h_0 / h)) * (x0 - previous_x0)
    if config.solver_type == "midpoint":
        second = first - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
    else:  # heun
        second = first + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
    return jnp.where(first_order, first, second), x0


def use_first_order(i, plan):
    """diffusers' warm-up and `lower_order_final`: first order at the first step, and at the last one
    when it lands on sigma = 0 or the run is short (where second order is unstable)."""
    config = plan.config
    final_first_order = config.euler_at_final or config.final_sigmas_type == "zero"
    short_run = jnp.logical_and(config.lower_order_final, plan.num_steps < 15)
    last_first_order = jnp.logical_and(i == plan.num_steps - 1, jnp.logical_or(final_first_order, short_run))
    return jnp.logical_or(i == plan.start, last_first_order)


DPM_2M = Sampler("dpm++2m", "DPMSolverMultistepScheduler", dpm_levels, _dpm_step, dpm_noise,
                 class_defaults={"timestep_spacing": "linspace"}, forced={"use_karras_sigmas": False},
                 description="DPM-Solver++ 2M")
DPM_2M_KARRAS = Sampler("dpm++2m_karras", "DPMSolverMultistepScheduler", dpm_levels, _dpm_step, dpm_noise,
                        class_defaults={"timestep_spacing": "linspace"}, forced={"use_karras_sigmas": True},
                        description="DPM-Solver++ 2M with Karras sigmas")
