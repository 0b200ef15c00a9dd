"""Noise schedules as diffusers defines them: betas, alphas_cumprod, sigmas, timestep spacing, SNR.

Pure numpy (float64 where diffusers computes in float64) so the values equal the reference's; the
samplers turn them into device arrays once per call.
"""

import math

import numpy as np

from jdiff.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def betas(schedule: str = "scaled_linear", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
          beta_end: float = 0.012) -> np.ndarray:
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    if schedule == "scaled_linear":  # linear in sqrt(beta): Stable Diffusion's schedule
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    if schedule == "squaredcos_cap_v2":  # cosine schedule (Nichol & Dhariwal), betas capped at 0.999
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        n = num_train_timesteps
        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                        dtype=np.float32)
    raise ConfigError(f"unknown beta schedule {schedule!r}; use one of {BETA_SCHEDULES}.")


def rescale_zero_terminal_snr(betas_: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alphas_cumprod) so the last timestep is pure noise (Lin et al. 2023)."""
    root = np.sqrt(np.cumprod(1.0 - betas_, axis=0))
    first, last = root[0].copy(), root[-1].copy()
    root = (root - last) * first / (first - last)
    alphas_cumprod = root**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (1 - alphas).astype(betas_.dtype)


def alphas_cumprod(betas_: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas_, axis=0)


def sigmas_from_alphas_cumprod(alphas_cumprod_: np.ndarray) -> np.ndarray:
    """k-diffusion's noise level of each training timestep: sqrt((1 - a) / a)."""
    return np.sqrt((1 - alphas_cumprod_) / alphas_cumprod_)


def snr(alphas_cumprod_: np.ndarray) -> np.ndarray:
    """Signal-to-noise ratio a / (1 - a) per training timestep (for min-SNR loss weighting)."""
    return alphas_cumprod_ / (1 - alphas_cumprod_)


def timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading",
              steps_offset: int = 0) -> np.ndarray:
    """The inference timesteps, highest first, as diffusers' schedulers space them."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ConfigError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}.")
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        return (np.round(np.arange(num_train_timesteps, 0, -ratio)) - 1).astype(np.int64)
    raise ConfigError(f"unknown timestep spacing {spacing!r}; use one of {SPACINGS}.")


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: evenly spaced in sigma^(1/rho), highest first."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigma: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating in log-sigma (as diffusers does)."""
    log_sigmas = np.log(train_sigmas)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma[:, None] - log_sigmas[None, :]
    low = np.clip(np.cumsum(dists >= 0, axis=1).argmax(axis=1), 0, len(log_sigmas) - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high
