"""Samplers as pure functions: the reverse diffusion as one `lax.fori_loop`, ready to sit in a jit.

Every sampler is called as `sampler(model_fn, x, plan, keys, config)`:

- `model_fn(x_in, t) -> output`: the denoiser (U-Net plus guidance), given the model input and a
  scalar timestep, returning an output of `config.prediction_type` (velocity for `flow_euler`);
- `x`: the starting latents, already scaled (`initial_latents` or `noised_latents`);
- `plan`: the schedule from `make_plan`, padded to a fixed length, with the step count and the
  first step (image-to-image) as traced scalars, so a new step count or strength is a new value
  for the compiled loop, never a new shape;
- `keys`: per-image PRNG keys `[B]` for the stochastic samplers (each image's noise depends only
  on its own key, so results do not change with batch composition or device count).

The plan is computed on the host in numpy exactly as diffusers' schedulers compute theirs, and each
update is written in the reference's operation order, so trajectories agree to float32 rounding.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import schedules
from jdiff.errors import ConfigError
from jdiff.schedules import SchedulerConfig, predicted_eps, predicted_x0

SAMPLERS = ("ddim", "ddpm", "euler", "euler_a", "dpm++2m", "dpm++2m_karras", "lcm", "flow_euler")

# Defaults of the diffusers scheduler class behind each sampler, where they differ from DDIM's; a
# checkpoint's scheduler_config.json overrides them, as `SchedulerClass.from_config` would.
_CLASS_DEFAULTS = {
    "euler": {"timestep_spacing": "linspace"},
    "euler_a": {"timestep_spacing": "linspace"},
    "dpm++2m": {"timestep_spacing": "linspace"},
    "dpm++2m_karras": {"timestep_spacing": "linspace"},
    "lcm": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False},
}
_FORCED = {"dpm++2m": {"use_karras_sigmas": False}, "dpm++2m_karras": {"use_karras_sigmas": True}}


class Plan(NamedTuple):
    """A sampling schedule. Arrays have a fixed length (num_train_timesteps + 1) whatever the
    step count; entries from `num_steps` on are padding."""

    timesteps: Any  # [L] float32: the timestep the model is given at step i
    alpha_bar: Any  # [L] alphas_cumprod at step i (DDPM, DDIM, LCM)
    alpha_bar_next: Any  # [L] alphas_cumprod of the level step i moves to
    sigmas: Any  # [L] noise level at step i (Euler, DPM-Solver++, flow); sigmas[num_steps] is the last
    num_steps: Any  # int32 scalar
    start: Any  # int32 scalar: the first step run (image-to-image skips the noisiest ones)
    init_noise_sigma: Any  # float32 scalar: scale of pure-noise starting latents
    eta: Any  # float32 scalar: DDIM's stochasticity (0 = deterministic)


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; valid samplers are: {', '.join(SAMPLERS)}.")


def sampler_config(name: str, config: SchedulerConfig, explicit: frozenset = frozenset()) -> SchedulerConfig:
    """`config` (a checkpoint's scheduler settings, `explicit` the fields it set) as the diffusers
    scheduler class behind sampler `name` would read it."""
    check_sampler(name)
    config = config.for_sampler(_CLASS_DEFAULTS.get(name, {}), explicit)
    return config.for_sampler(_FORCED.get(name, {}), frozenset())


# --- plans (host side, numpy) -------------------------------------------------------------------


def _img2img_start(num_steps: int, strength: float) -> int:
    """diffusers' `get_timesteps`: strength s runs the last int(N * s) of the N steps."""
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength must be in (0, 1], got {strength}.")
    start = num_steps - min(int(num_steps * strength), num_steps)
    if start >= num_steps:
        raise ConfigError(f"strength {strength} with {num_steps} steps leaves no step to run; "
                          f"raise the strength or the step count.")
    return start


def _vp_levels(config, ts, next_ts, final):
    a = schedules.train_alphas_cumprod(config)
    a_next = np.where(next_ts >= 0, a[np.maximum(next_ts, 0)], np.float32(final))
    return ts.astype(np.float32), a[ts], a_next.astype(np.float32), np.zeros(len(ts) + 1, np.float32), 1.0


def _ddim_levels(config, n):
    ts = schedules.timesteps(n, config.num_train_timesteps, config.timestep_spacing, config.steps_offset)
    final = 1.0 if config.set_alpha_to_one else schedules.train_alphas_cumprod(config)[0]
    return _vp_levels(config, ts, ts - config.num_train_timesteps // n, final)


def _ddpm_levels(config, n):
    ts = schedules.timesteps(n, config.num_train_timesteps, config.timestep_spacing, config.steps_offset)
    return _vp_levels(config, ts, ts - config.num_train_timesteps // n, 1.0)


def _lcm_levels(config, n):
    original = config.original_inference_steps
    if not 1 <= n <= original <= config.num_train_timesteps:
        raise ConfigError(f"LCM takes 1..{original} steps (original_inference_steps), got {n}.")
    k = config.num_train_timesteps // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1]
    ts = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    return _vp_levels(config, ts, np.append(ts[1:], -1), 1.0)


def _train_sigmas(config):
    a = schedules.train_alphas_cumprod(config)
    if config.rescale_betas_zero_snr:
        a = a.copy()
        a[-1] = 2**-24  # diffusers' guard: a zero terminal SNR would make sigma infinite
    return (((1 - a) / a) ** 0.5).astype(np.float32)


def _euler_levels(config, n):
    t_count = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, t_count - 1, n, dtype=np.float32)[::-1].copy()
    else:
        ts = schedules.timesteps(n, t_count, config.timestep_spacing, config.steps_offset).astype(np.float32)
    train = _train_sigmas(config)
    sigmas = np.interp(ts, np.arange(len(train)), train)
    if config.use_karras_sigmas:
        sigmas = schedules.karras_sigmas(sigmas[-1], sigmas[0], n)
        ts = schedules.sigma_to_timestep(sigmas, train)
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    max_sigma = float(sigmas.max())
    init = max_sigma if config.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
    zeros = np.zeros(n, np.float32)
    return ts.astype(np.float32), zeros, zeros, sigmas, init


def _dpm_levels(config, n):
    t_count = config.num_train_timesteps
    # DPM-Solver's own spacing: n + 1 points with the last dropped (diffusers' multistep schedulers).
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, t_count - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        ratio = t_count // (n + 1)
        ts = (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    else:
        ts = np.arange(t_count, 0, -t_count / n).round().astype(np.int64) - 1
    train = _train_sigmas(config)
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
    zeros = np.zeros(n, np.float32)
    return ts.astype(np.float32), zeros, zeros, sigmas, 1.0


def _flow_levels(config, n):
    t_count, shift = config.num_train_timesteps, config.shift
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)
    sigma_max = 1.0
    sigma_min = float(np.float32(shifted(np.float32(1.0 / t_count))))  # the schedule's smallest level
    sigmas = shifted(np.linspace(sigma_max * t_count, sigma_min * t_count, n) / t_count).astype(np.float32)
    ts = sigmas * np.float32(t_count)
    zeros = np.zeros(n, np.float32)
    return ts, zeros, zeros, np.append(sigmas, 0.0).astype(np.float32), 1.0


_LEVELS = {"ddim": _ddim_levels, "ddpm": _ddpm_levels, "euler": _euler_levels, "euler_a": _euler_levels,
           "dpm++2m": _dpm_levels, "dpm++2m_karras": _dpm_levels, "lcm": _lcm_levels, "flow_euler": _flow_levels}


def make_plan(name: str, config: SchedulerConfig, num_steps: int, strength: float = 1.0, eta: float = 0.0) -> Plan:
    """The schedule of sampler `name` for `num_steps` steps, as numpy arrays of a fixed length.

    `config` should come from `sampler_config`. `strength` < 1 starts part-way (image-to-image).
    """
    check_sampler(name)
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= config.num_train_timesteps:
        raise ConfigError(f"steps must be an integer in 1..{config.num_train_timesteps}, got {num_steps!r}.")
    start = _img2img_start(num_steps, strength)
    ts, a, a_next, sigmas, init = _LEVELS[name](config, num_steps)
    length = config.num_train_timesteps + 1
    pad = lambda v: np.pad(np.asarray(v, np.float32), (0, length - len(v)), mode="edge")
    return Plan(pad(ts), pad(a), pad(a_next), pad(sigmas), np.int32(num_steps), np.int32(start),
                np.float32(init), np.float32(eta))


# --- the update rules (traced) ------------------------------------------------------------------


def step_noise(keys, i, like):
    """Per-image standard normal noise for step i, from each image's own key."""
    if keys is None:
        raise ValueError("this sampler draws noise at every step: pass per-image PRNG keys.")
    draw = lambda key: jax.random.normal(jax.random.fold_in(key, i), like.shape[1:], like.dtype)
    return jax.vmap(draw)(keys)


def _clip(x0, config):
    return jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range) if config.clip_sample else x0


def _ddim_step(model_fn, x, i, plan, state, keys, config):
    a, a_prev = plan.alpha_bar[i], plan.alpha_bar_next[i]
    out = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
    b = 1 - a
    x0 = _clip(predicted_x0(out, x, a**0.5, b**0.5, config.prediction_type), config)
    eps = predicted_eps(out, x, a**0.5, b**0.5, config.prediction_type)
    variance = ((1 - a_prev) / b) * (1 - a / a_prev)
    std = plan.eta * variance**0.5
    x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if keys is None:  # deterministic use without keys (eta must then be 0)
        return x, state
    # drawing noise costs a little every step: skip it when eta = 0 (the usual, deterministic case)
    x = jax.lax.cond(plan.eta > 0, lambda x: x + std * step_noise(keys, i, x), lambda x: x, x)
    return x, state


def _ddpm_step(model_fn, x, i, plan, state, keys, config):
    t, a, a_prev = plan.timesteps[i], plan.alpha_bar[i], plan.alpha_bar_next[i]
    out = model_fn(x, t).astype(jnp.float32)
    b, b_prev = 1 - a, 1 - a_prev
    alpha_t = a / a_prev
    beta_t = 1 - alpha_t
    x0 = _clip(predicted_x0(out, x, a**0.5, b**0.5, config.prediction_type), config)
    mean = (a_prev**0.5 * beta_t) / b * x0 + alpha_t**0.5 * b_prev / b * x
    if config.variance_type == "fixed_small":
        variance = jnp.maximum(b_prev / b * beta_t, 1e-20)
    else:
        variance = beta_t
    std = jnp.where(t > 0, variance**0.5, 0.0)
    return mean + std * step_noise(keys, i, x), state


def _k_x0(out, x, sigma, config):
    """Clean-sample estimate in k-diffusion's scaling (x = x0 + sigma * eps), diffusers' Euler order."""
    if config.prediction_type == "epsilon":
        return x - sigma * out
    if config.prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    return out


def _euler_step(model_fn, x, i, plan, state, keys, config):
    sigma = plan.sigmas[i]
    out = model_fn(x / ((sigma**2 + 1) ** 0.5), plan.timesteps[i]).astype(jnp.float32)
    derivative = (x - _k_x0(out, x, sigma, config)) / sigma
    return x + derivative * (plan.sigmas[i + 1] - sigma), state


def _euler_ancestral_step(model_fn, x, i, plan, state, keys, config):
    sigma, sigma_to = plan.sigmas[i], plan.sigmas[i + 1]
    out = model_fn(x / ((sigma**2 + 1) ** 0.5), plan.timesteps[i]).astype(jnp.float32)
    sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    derivative = (x - _k_x0(out, x, sigma, config)) / sigma
    x = x + derivative * (sigma_down - sigma)
    return x + step_noise(keys, i, x) * sigma_up, state


def _vp(sigma):
    """alpha_t, sigma_t of the variance-preserving sample whose k-diffusion noise level is sigma."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _dpm_step(model_fn, x, i, plan, previous_x0, keys, config):
    """DPM-Solver++ (2M): a second-order multistep update on the previous step's x0 estimate."""
    alpha_s0, sigma_s0 = _vp(plan.sigmas[i])
    alpha_t, sigma_t = _vp(plan.sigmas[i + 1])
    alpha_s1, sigma_s1 = _vp(plan.sigmas[jnp.maximum(i - 1, 0)])
    out = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
    x0 = predicted_x0(out, x, alpha_s0, sigma_s0, config.prediction_type)
    lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
    lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
    lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    first = (sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * x0
    d1 = (1.0 / (h_0 / h)) * (x0 - previous_x0)
    if config.solver_type == "midpoint":
        second = first - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
    else:  # heun
        second = first + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
    # diffusers' warm-up and `lower_order_final`: first order at the first step, and at the last one
    # when it lands on sigma = 0 or the run is short (where second order is unstable)
    final_first_order = config.euler_at_final or config.final_sigmas_type == "zero"
    short_run = jnp.logical_and(config.lower_order_final, plan.num_steps < 15)
    last_first_order = jnp.logical_and(i == plan.num_steps - 1, jnp.logical_or(final_first_order, short_run))
    use_first = jnp.logical_or(i == plan.start, last_first_order)
    return jnp.where(use_first, first, second), x0


def _lcm_step(model_fn, x, i, plan, state, keys, config):
    t, a, a_prev = plan.timesteps[i], plan.alpha_bar[i], plan.alpha_bar_next[i]
    out = model_fn(x, t).astype(jnp.float32)
    scaled_t = t * config.timestep_scaling
    c_skip = 0.5**2 / (scaled_t**2 + 0.5**2)
    c_out = scaled_t / (scaled_t**2 + 0.5**2) ** 0.5
    x0 = _clip(predicted_x0(out, x, jnp.sqrt(a), jnp.sqrt(1 - a), config.prediction_type), config)
    denoised = c_out * x0 + c_skip * x
    # the last step has a_prev = 1, which returns `denoised` itself
    return jnp.sqrt(a_prev) * denoised + jnp.sqrt(1 - a_prev) * step_noise(keys, i, x), state


def _flow_step(model_fn, x, i, plan, state, keys, config):
    velocity = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
    return x + (plan.sigmas[i + 1] - plan.sigmas[i]) * velocity, state


# --- forward noising (image-to-image, inpainting) -----------------------------------------------


def _vp_noise(x0, noise, plan, i):
    a = plan.alpha_bar[i]
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def _k_noise(x0, noise, plan, i):
    return x0 + noise * plan.sigmas[i]


def _dpm_noise(x0, noise, plan, i):
    alpha, sigma = _vp(plan.sigmas[i])
    return alpha * x0 + sigma * noise


def _flow_noise(x0, noise, plan, i):
    sigma = plan.sigmas[i]
    return sigma * noise + (1.0 - sigma) * x0


class _Rule(NamedTuple):
    step: Callable
    add_noise: Callable


_RULES = {
    "ddim": _Rule(_ddim_step, _vp_noise),
    "ddpm": _Rule(_ddpm_step, _vp_noise),
    "euler": _Rule(_euler_step, _k_noise),
    "euler_a": _Rule(_euler_ancestral_step, _k_noise),
    "dpm++2m": _Rule(_dpm_step, _dpm_noise),
    "dpm++2m_karras": _Rule(_dpm_step, _dpm_noise),
    "lcm": _Rule(_lcm_step, _vp_noise),
    "flow_euler": _Rule(_flow_step, _flow_noise),
}


def initial_latents(name: str, noise, plan: Plan):
    """Starting latents of text-to-image: pure noise at the sampler's initial scale."""
    return noise * plan.init_noise_sigma


def noised_latents(name: str, x0, noise, plan: Plan, level=None):
    """`x0` noised to the level of step `level` (default: the plan's first step), as diffusers'
    `scheduler.add_noise` does for image-to-image."""
    check_sampler(name)
    return _RULES[name].add_noise(x0, noise, plan, plan.start if level is None else level)


def sample(name: str, model_fn, x, plan: Plan, keys, config: SchedulerConfig, known=None):
    """Runs sampler `name` from `x` over the plan's steps `start..num_steps-1`; returns the latents.

    known: optional `(x0, mask, noise)` for inpainting with an ordinary model: after every step the
    region where mask == 0 is replaced by `x0` noised to the new level (diffusers' blending).
    """
    check_sampler(name)
    rule = _RULES[name]
    x = x.astype(jnp.float32)

    def body(i, carry):
        x, state = carry
        x, state = rule.step(model_fn, x, i, plan, state, keys, config)
        if known is not None:
            x0, mask, noise = known
            level = i + 1
            reference = jnp.where(level < plan.num_steps, rule.add_noise(x0, noise, plan, level), x0)
            x = (1 - mask) * reference + mask * x
        return x, state

    x, _ = jax.lax.fori_loop(plan.start, plan.num_steps, body, (x, jnp.zeros_like(x)))
    return x


ddim = functools.partial(sample, "ddim")
ddpm = functools.partial(sample, "ddpm")
euler = functools.partial(sample, "euler")
euler_ancestral = functools.partial(sample, "euler_a")
dpm_solver_pp_2m = functools.partial(sample, "dpm++2m")
lcm = functools.partial(sample, "lcm")
flow_euler = functools.partial(sample, "flow_euler")
