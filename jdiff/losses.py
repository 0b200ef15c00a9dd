"""Training losses: the diffusion objective (epsilon / v / x0 targets, min-SNR weighting, noise
offset) and the VAE objective (L1 or L2 reconstruction plus a KL term). Pure functions of arrays."""

import dataclasses

import jax
import jax.numpy as jnp

from jdiff.errors import ConfigError
from jdiff.schedules import SchedulerConfig, prediction_target, train_alphas_cumprod

RECONSTRUCTION_LOSSES = ("l1", "l2")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def sample_timesteps(rng, batch_size: int, num_train_timesteps: int, sampling: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0):
    """Training timesteps, int32 [batch_size].

    uniform:      every timestep equally often (DDPM, Stable Diffusion).
    logit_normal: t / T = sigmoid(N(logit_mean, logit_std)) (SD3's choice for flow matching, here on
                  the discrete schedule): fewer steps at the two ends, where the image is almost clean
                  or almost pure noise, more in between; a negative mean leans towards less noise.
    """
    check_timestep_sampling(sampling, logit_std)
    if sampling == "uniform":
        return jax.random.randint(rng, (batch_size,), 0, num_train_timesteps)
    u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch_size,)))
    return jnp.minimum((u * num_train_timesteps).astype(jnp.int32), num_train_timesteps - 1)


def check_timestep_sampling(sampling: str, logit_std: float = 1.0) -> None:
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ConfigError(f"unknown diffusion.timestep_sampling {sampling!r}; use one of {TIMESTEP_SAMPLINGS}.")
    if sampling == "logit_normal" and not logit_std > 0:
        raise ConfigError(f"diffusion.logit_std must be positive, got {logit_std}.")


def sample_noise(rng, shape, noise_offset: float = 0.0):
    """Standard normal noise, plus an optional per-channel constant (the "noise offset" trick) that
    lets a model learn overall brightness changes the usual noise cannot express."""
    noise_rng, offset_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, shape, jnp.float32)
    if noise_offset:
        noise = noise + noise_offset * jax.random.normal(offset_rng, (shape[0], 1, 1, shape[-1]), jnp.float32)
    return noise


def add_noise(x0, noise, timesteps, alphas_cumprod):
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, with a_t looked up per example."""
    a = alphas_cumprod[timesteps].reshape(-1, *([1] * (x0.ndim - 1)))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def min_snr_weights(timesteps, alphas_cumprod, gamma: float, prediction_type: str):
    """Min-SNR-gamma loss weights (Hang et al. 2023), expressed for the model's own target: the
    x0-space weight min(SNR, gamma) divided by what the target's MSE already carries."""
    a = alphas_cumprod[timesteps]
    snr = a / (1 - a)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(model_output, x0, noise, timesteps, alphas_cumprod, *, prediction_type: str,
                   min_snr_gamma: float = 0.0):
    """Mean squared error between the model output and its target at the sampled timesteps; with
    min_snr_gamma > 0, each example weighted by min-SNR. Returns (loss, per-example losses)."""
    a = alphas_cumprod[timesteps].reshape(-1, *([1] * (x0.ndim - 1)))
    target = prediction_target(x0, noise, jnp.sqrt(a), jnp.sqrt(1 - a), prediction_type)
    per_example = jnp.mean((model_output.astype(jnp.float32) - target) ** 2, axis=tuple(range(1, x0.ndim)))
    if min_snr_gamma:
        per_example = per_example * min_snr_weights(timesteps, alphas_cumprod, min_snr_gamma, prediction_type)
    return jnp.mean(per_example), per_example


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a denoiser learns: its schedule and prediction type (the checkpoint's scheduler when
    fine-tuning, see `schedules.training_scheduler`) and how timesteps and noise are drawn."""

    schedule: SchedulerConfig
    min_snr_gamma: float = 0.0  # 0 = plain MSE
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    noise_offset: float = 0.0

    def __post_init__(self):
        check_timestep_sampling(self.timestep_sampling, self.logit_std)


def denoising_loss(objective: Objective, model_fn, x0, timestep_rng, noise_rng):
    """The loss of `model_fn(noisy, timesteps) -> output` on clean latents x0 [B, ...]: noise drawn,
    x0 noised at drawn timesteps, output compared with the objective's target, as diffusers'
    training scripts do (`add_noise`, `get_velocity`). Returns (loss, per-example losses)."""
    schedule = objective.schedule
    alphas_cumprod = jnp.asarray(train_alphas_cumprod(schedule))
    timesteps = sample_timesteps(timestep_rng, x0.shape[0], schedule.num_train_timesteps,
                                 objective.timestep_sampling, objective.logit_mean, objective.logit_std)
    noise = sample_noise(noise_rng, x0.shape, objective.noise_offset)
    output = model_fn(add_noise(x0, noise, timesteps, alphas_cumprod), timesteps)
    return diffusion_loss(output, x0, noise, timesteps, alphas_cumprod, prediction_type=schedule.prediction_type,
                          min_snr_gamma=objective.min_snr_gamma)


def reconstruction_loss(reconstruction, target, kind: str = "l1"):
    if kind not in RECONSTRUCTION_LOSSES:
        raise ConfigError(f"unknown reconstruction loss {kind!r}; use one of {RECONSTRUCTION_LOSSES}.")
    error = reconstruction.astype(jnp.float32) - target
    return jnp.mean(jnp.abs(error)) if kind == "l1" else jnp.mean(error**2)


def vae_loss(reconstruction, target, posterior, *, kl_weight: float, kind: str = "l1"):
    """Reconstruction + kl_weight * KL(posterior || N(0, 1)) (per latent element, averaged), as in
    Stable Diffusion's autoencoder without its adversarial and perceptual terms."""
    recon = reconstruction_loss(reconstruction, target, kind)
    kl = jnp.mean(posterior.kl()) / jnp.prod(jnp.asarray(posterior.mean.shape[1:]))
    return recon + kl_weight * kl, {"reconstruction": recon, "kl": kl}


def psnr(reconstruction, target, data_range: float = 2.0):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (range 2), averaged over the batch."""
    mse = jnp.mean((jnp.clip(reconstruction, -1, 1) - target) ** 2, axis=tuple(range(1, target.ndim)))
    return jnp.mean(10 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-10)))
