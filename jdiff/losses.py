"""Training losses: the diffusion objective on a noise schedule (epsilon / v / x0 targets, min-SNR
weighting, noise offset), the rectified-flow objective (velocity target, SD3's timestep densities and
loss weightings) and the VAE objective (L1 or L2 reconstruction plus a KL term). Pure functions of
arrays."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.errors import ConfigError
from jdiff.schedules import SchedulerConfig, prediction_target, train_alphas_cumprod

RECONSTRUCTION_LOSSES = ("l1", "l2")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def sample_unit(rng, batch_size: int, sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                mode_scale: float = 1.29):
    """u in [0, 1), float32 [batch_size]: where in the training schedule each example lands, drawn
    with the density diffusers' `compute_density_for_timestep_sampling` names (SD3 paper, sec. 3.1).

    uniform:      every place equally often.
    logit_normal: u = sigmoid(N(logit_mean, logit_std)): fewer examples at the two ends, where the
                  image is almost clean or almost pure noise, more in between.
    mode:         u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v), v uniform: a heavier middle
                  (mode_scale > 0) or heavier ends (< 0); mode_scale must lie in [-1, 2/(pi-2)].
    """
    check_timestep_sampling(sampling, logit_std, mode_scale)
    if sampling == "logit_normal":
        return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch_size,)))
    u = jax.random.uniform(rng, (batch_size,))
    if sampling == "mode":
        u = 1 - u - mode_scale * (jnp.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_timesteps(rng, batch_size: int, num_train_timesteps: int, sampling: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
    """Training timesteps of a noise schedule, int32 [batch_size]: t = floor(u T) for u from
    `sample_unit` (uniform: a uniform integer draw), so a negative logit_mean leans towards less
    noise."""
    check_timestep_sampling(sampling, logit_std, mode_scale)
    if sampling == "uniform":
        return jax.random.randint(rng, (batch_size,), 0, num_train_timesteps)
    u = sample_unit(rng, batch_size, sampling, logit_mean, logit_std, mode_scale)
    return jnp.clip((u * num_train_timesteps).astype(jnp.int32), 0, num_train_timesteps - 1)


def check_timestep_sampling(sampling: str, logit_std: float = 1.0, mode_scale: float = 1.29) -> None:
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ConfigError(f"unknown diffusion.timestep_sampling {sampling!r}; use one of {TIMESTEP_SAMPLINGS}.")
    if sampling == "logit_normal" and not logit_std > 0:
        raise ConfigError(f"diffusion.logit_std must be positive, got {logit_std}.")
    # beyond these bounds the mode density's u leaves [0, 1] (SD3 paper, appendix B.4)
    if sampling == "mode" and not -1 <= mode_scale <= 2 / (math.pi - 2):
        raise ConfigError(f"diffusion.mode_scale must lie in [-1, {2 / (math.pi - 2):.3f}], got {mode_scale}.")


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


# --- rectified flow (SD3, Flux) -------------------------------------------------------------------


def flow_training_sigmas(schedule: SchedulerConfig) -> np.ndarray:
    """The noise levels a flow model trains on, float32 [T], from 1 down: the table diffusers'
    FlowMatchEulerDiscreteScheduler builds when created (shifted by `shift` unless the shift is
    dynamic, which training leaves out, as diffusers' Flux scripts do)."""
    count = schedule.num_train_timesteps
    sigmas = np.linspace(1, count, count, dtype=np.float32)[::-1] / np.float32(count)
    if not schedule.use_dynamic_shifting:
        sigmas = (schedule.shift * sigmas / (1 + (schedule.shift - 1) * sigmas)).astype(np.float32)
    return sigmas


def flow_loss_weights(weighting: str, sigmas):
    """diffusers' `compute_loss_weighting_for_sd3`: none (1), sigma_sqrt (sigma^-2) or cosmap
    (2 / (pi (1 - 2 sigma + 2 sigma^2)))."""
    if weighting == "sigma_sqrt":
        return sigmas**-2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return jnp.ones_like(sigmas)


def flow_matching_loss(model_output, x0, noise, sigmas, noisy, *, weighting: str = "none",
                       precondition_outputs: bool = False):
    """Weighted MSE between the predicted velocity and noise - x0 (per example, averaged), as
    diffusers' SD3 and Flux training scripts compute it. precondition_outputs: compare
    noisy - sigma * output with x0 instead (train_dreambooth_sd3's default; the same error times
    sigma). Returns (loss, per-example losses)."""
    per_sigma = sigmas.reshape(-1, *([1] * (x0.ndim - 1)))
    output = model_output.astype(jnp.float32)
    if precondition_outputs:
        output, target = noisy - per_sigma * output, x0
    else:
        target = noise - x0
    weights = flow_loss_weights(weighting, per_sigma)
    per_example = jnp.mean(weights * (output - target) ** 2, axis=tuple(range(1, x0.ndim)))
    return jnp.mean(per_example), per_example


# --- the objective -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a denoiser learns: its schedule and prediction type (the checkpoint's scheduler when
    fine-tuning, see `schedules.training_scheduler`) and how timesteps and noise are drawn.

    flow: the schedule is rectified flow (the model predicts noise - x0; see `flow_matching_loss`);
    its timesteps are drawn as diffusers' SD3/Flux scripts draw them, sigma = the
    `flow_training_sigmas` entry at floor(u T), so that table's descending order makes a positive
    logit_mean lean towards less noise there. flow_weighting and precondition_outputs are its loss
    options; min_snr_gamma belongs to noise schedules.
    guidance: the scale given to a denoiser that embeds one (Flux-dev), as diffusers' Flux scripts
    (--guidance_scale, default 3.5); None gives none (an LCM U-Net's w-embedding stays unused)."""

    schedule: SchedulerConfig
    min_snr_gamma: float = 0.0  # 0 = plain MSE
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    noise_offset: float = 0.0
    flow: bool = False
    flow_weighting: str = "none"
    precondition_outputs: bool = False
    guidance: float | None = None

    def __post_init__(self):
        check_timestep_sampling(self.timestep_sampling, self.logit_std, self.mode_scale)
        if self.flow_weighting not in FLOW_WEIGHTINGS:
            raise ConfigError(f"unknown diffusion.flow_weighting {self.flow_weighting!r}; use one of {FLOW_WEIGHTINGS}.")
        if self.flow and self.min_snr_gamma:
            raise ConfigError("diffusion.min_snr_gamma weighs a noise schedule's SNR; a rectified-flow model "
                              "weighs its loss with diffusion.flow_weighting ('sigma_sqrt', 'cosmap') instead.")
        if not self.flow and (self.flow_weighting != "none" or self.precondition_outputs):
            raise ConfigError("diffusion.flow_weighting and diffusion.precondition_outputs are rectified-flow "
                              "loss options; this model's schedule is a noise schedule (use min_snr_gamma).")


def objective_record(objective: Objective) -> dict:
    """The objective's defining fields, as checkpoints record them for the resume check: a noise
    schedule's without the rectified-flow options (as runs begun before they existed recorded it),
    mode_scale only where the mode density uses it."""
    record = dataclasses.asdict(objective)
    if not objective.flow:
        for name in ("flow", "flow_weighting", "precondition_outputs", "guidance"):
            record.pop(name)
    if objective.timestep_sampling != "mode":
        record.pop("mode_scale")
    return record


def denoising_loss(objective: Objective, model_fn, x0, timestep_rng, noise_rng):
    """The loss of `model_fn(noisy, timesteps) -> output` on clean latents x0 [B, ...]: noise drawn,
    x0 noised at drawn timesteps, output compared with the objective's target, as diffusers'
    training scripts do (`add_noise` and `get_velocity`; for flow `(1 - sigma) x0 + sigma noise` and
    noise - x0). Returns (loss, per-example losses)."""
    if objective.flow:
        return _flow_denoising_loss(objective, model_fn, x0, timestep_rng, noise_rng)
    schedule = objective.schedule
    alphas_cumprod = jnp.asarray(train_alphas_cumprod(schedule))
    timesteps = sample_timesteps(timestep_rng, x0.shape[0], schedule.num_train_timesteps,
                                 objective.timestep_sampling, objective.logit_mean, objective.logit_std,
                                 objective.mode_scale)
    noise = sample_noise(noise_rng, x0.shape, objective.noise_offset)
    output = model_fn(add_noise(x0, noise, timesteps, alphas_cumprod), timesteps)
    return diffusion_loss(output, x0, noise, timesteps, alphas_cumprod, prediction_type=schedule.prediction_type,
                          min_snr_gamma=objective.min_snr_gamma)


def flow_sigmas(objective: Objective, rng, batch_size: int):
    """The drawn training noise levels of a flow objective, float32 [batch_size]."""
    table = flow_training_sigmas(objective.schedule)
    u = sample_unit(rng, batch_size, objective.timestep_sampling, objective.logit_mean, objective.logit_std,
                    objective.mode_scale)
    index = jnp.clip((u * len(table)).astype(jnp.int32), 0, len(table) - 1)
    return jnp.asarray(table)[index]


def _flow_denoising_loss(objective: Objective, model_fn, x0, timestep_rng, noise_rng):
    sigmas = flow_sigmas(objective, timestep_rng, x0.shape[0])
    noise = sample_noise(noise_rng, x0.shape, objective.noise_offset)
    per_sigma = sigmas.reshape(-1, *([1] * (x0.ndim - 1)))
    noisy = (1 - per_sigma) * x0 + per_sigma * noise
    # the model's timestep is sigma T, the scheduler's timesteps, as at sampling time
    output = model_fn(noisy, sigmas * objective.schedule.num_train_timesteps)
    return flow_matching_loss(output, x0, noise, sigmas, noisy, weighting=objective.flow_weighting,
                              precondition_outputs=objective.precondition_outputs)


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
