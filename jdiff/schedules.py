"""Noise schedules as diffusers defines them: betas, alphas_cumprod, sigmas, timestep spacing, SNR.

Pure numpy (float64 where diffusers computes in float64) so the values equal the reference's; the
samplers turn them into device arrays once per call.
"""

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np

from jdiff import paths
from jdiff.errors import ConfigError
from jdiff.paths import Path

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SOLVER_TYPES = ("midpoint", "heun", "logrho", "bh1", "bh2")  # each solver class maps the others to its own


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
    root = np.sqrt(alphas_cumprod(betas_))
    first, last = root[0].copy(), root[-1].copy()
    root = (root - last) * first / (first - last)
    cumulative = root**2
    alphas = np.concatenate([cumulative[:1], cumulative[1:] / cumulative[:-1]])
    return (1 - alphas).astype(betas_.dtype)


def alphas_cumprod(betas_: np.ndarray) -> np.ndarray:
    # accumulated in float64 and rounded once, as torch.cumprod does for float32 input
    return np.cumprod((1.0 - betas_).astype(np.float64), axis=0).astype(betas_.dtype)


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


# --- prediction types -------------------------------------------------------------------------
# A noisy sample is x = alpha * x0 + sigma * eps with alpha = sqrt(alphas_cumprod), sigma = sqrt(1 -
# alphas_cumprod). The formulas are written in diffusers' operation order so float32 results agree.


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}.")


def predicted_x0(output, x, alpha, sigma, prediction_type: str):
    """The clean sample implied by a model `output` of the given prediction type at noisy `x`."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * output
    return output


def predicted_eps(output, x, alpha, sigma, prediction_type: str):
    """The noise implied by a model `output` of the given prediction type at noisy `x`."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha * output + sigma * x
    return (x - alpha * output) / sigma


def prediction_target(x0, eps, alpha, sigma, prediction_type: str):
    """What a model of this prediction type should output for the noisy sample alpha*x0 + sigma*eps."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    return x0


# --- scheduler_config.json ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The noise schedule and sampler settings of a checkpoint (diffusers' scheduler fields).

    Field defaults are diffusers' DDIMScheduler defaults; `for_sampler` swaps in the defaults of
    the diffusers class that matches a sampler, as `SomeScheduler.from_config(config)` would.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    skip_prk_steps: bool = False  # PNDM: False runs its Runge-Kutta warm-up (SD 1.x checkpoints set True)
    variance_type: str = "fixed_small"  # DDPM
    use_karras_sigmas: bool = False  # Euler, DPM-Solver++
    final_sigmas_type: str = "zero"  # DPM-Solver++
    solver_type: str = "midpoint"  # DPM-Solver++ (midpoint, heun), UniPC (bh1, bh2)
    solver_order: int = 2  # DPM-Solver++, UniPC
    algorithm_type: str = "dpmsolver++"  # DPM-Solver++ (sde-dpmsolver++ adds noise every step)
    lower_order_final: bool = True  # DPM-Solver++
    euler_at_final: bool = False  # DPM-Solver++
    original_inference_steps: int = 50  # LCM
    timestep_scaling: float = 10.0  # LCM
    shift: float = 1.0  # flow matching
    # Flow matching with the shift chosen per image size (Flux-dev): mu grows linearly in the
    # image's token count from base_shift at base_image_seq_len to max_shift at max_image_seq_len.
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    def validate(self, source: str = "scheduler config") -> None:
        checks = {
            "beta_schedule": (self.beta_schedule, BETA_SCHEDULES),
            "prediction_type": (self.prediction_type, PREDICTION_TYPES),
            "timestep_spacing": (self.timestep_spacing, SPACINGS),
            "variance_type": (self.variance_type, ("fixed_small", "fixed_large")),
            "final_sigmas_type": (self.final_sigmas_type, ("zero", "sigma_min")),
            "solver_type": (self.solver_type, SOLVER_TYPES),
            "algorithm_type": (self.algorithm_type, ("dpmsolver++", "sde-dpmsolver++")),
            "time_shift_type": (self.time_shift_type, ("exponential", "linear")),
        }
        for name, (value, valid) in checks.items():
            if value not in valid:
                raise ConfigError(f"{source}: {name} {value!r} is not supported; use one of {valid}.")
        if not isinstance(self.skip_prk_steps, bool):
            raise ConfigError(f"{source}: skip_prk_steps must be true or false, got {self.skip_prk_steps!r}.")
        if self.num_train_timesteps < 2:
            raise ConfigError(f"{source}: num_train_timesteps must be at least 2, got {self.num_train_timesteps}.")
        if self.solver_order not in (1, 2, 3):
            raise ConfigError(f"{source}: solver_order must be 1, 2 or 3, got {self.solver_order!r}.")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ConfigError(f"{source}: trained_betas has {len(self.trained_betas)} values for "
                              f"{self.num_train_timesteps} timesteps.")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "scheduler config") -> "SchedulerConfig":
        """Known fields of `raw`; the rest belong to other scheduler classes and are ignored, as
        diffusers' `from_config` does. Settings jdiff cannot honour are refused by name."""
        for key, allowed in _UNSUPPORTED.items():
            if key in raw and raw[key] not in allowed:
                raise ConfigError(f"{source}: {key} = {raw[key]!r} is not supported by jdiff.")
        # null stands for the class default (DPM-Solver files store `"variance_type": null`)
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()
                  if k in defaults and not (v is None and defaults[k] is not None)}
        config = cls(**kwargs)
        config.validate(source)
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def for_sampler(self, sampler_defaults: Mapping[str, Any], explicit: frozenset) -> "SchedulerConfig":
        """This config with `sampler_defaults` applied to every field not in `explicit`."""
        return dataclasses.replace(self, **{k: v for k, v in sampler_defaults.items() if k not in explicit})

    def as_read_by(self, class_name: str) -> "SchedulerConfig":
        """This config after the rewrites diffusers' `class_name` makes on load: UniPC and the
        DPM-Solver classes each take the other family's solver types as their own default."""
        dpm = (("midpoint", "heun"), "midpoint")
        own = {"UniPCMultistepScheduler": (("bh1", "bh2"), "bh2"), "DPMSolverMultistepScheduler": dpm,
               "DPMSolverSinglestepScheduler": dpm}.get(class_name)
        if own is None or self.solver_type in own[0]:
            return self
        return dataclasses.replace(self, solver_type=own[1])


# Scheduler options whose non-default values would change results in ways jdiff does not implement.
_UNSUPPORTED = {
    "thresholding": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False, None),
    "shift_terminal": (None, 0, 0.0),
    "algorithm_type": ("dpmsolver++", "sde-dpmsolver++", None),
    "lambda_min_clipped": (-math.inf, None),
    "predict_x0": (True, None),  # UniPC on noise predictions
    "disable_corrector": ([], None),
    "solver_p": (None,),
    "use_flow_sigmas": (False, None),
    "sigma_min": (None,),  # custom Karras range ends
    "sigma_max": (None,),
    "interpolation_type": ("linear", None),
    "timestep_type": ("discrete", None),
    "invert_sigmas": (False, None),
    "stochastic_sampling": (False, None),
}


def is_flow(scheduler_class: str) -> bool:
    """True for a rectified-flow scheduler (the model predicts a velocity between data and noise)."""
    return scheduler_class.startswith("FlowMatch")


def flow_shift_mu(config: SchedulerConfig, image_seq_len: int) -> float:
    """diffusers' `calculate_shift`: the dynamic shift for an image of `image_seq_len` tokens."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return image_seq_len * slope + config.base_shift - slope * config.base_image_seq_len


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """A checkpoint's scheduler: its settings, the diffusers class its file names (which sampler
    `generate` runs by default), and the fields the file sets explicitly (so a sampler's class
    defaults fill only the others, as `SomeScheduler.from_config` would)."""

    config: SchedulerConfig = SchedulerConfig()
    class_name: str = "DDIMScheduler"
    explicit: frozenset = frozenset()

    def to_json_dict(self) -> dict:
        return {"_class_name": self.class_name, **self.config.to_dict()}


# The fields a training run may set on a pretrained model's scheduler.
TRAINING_FIELDS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                   "timestep_spacing", "rescale_betas_zero_snr")
FLOW_TRAINING_FIELDS = ("num_train_timesteps", "shift")  # a rectified-flow schedule has no betas


def training_scheduler(base: Scheduler, overrides: Mapping[str, Any], change_prediction_type: bool = False,
                       source: str = "config.diffusion.schedule") -> Scheduler:
    """The scheduler a run trains with: `base` (the checkpoint's, or the one a model built from a
    config ships) with the fields `overrides` sets (None = keep the base's). The result records
    what was trained, so an export's scheduler_config.json says it. Training a model for another
    prediction type than it was trained for is a new objective, allowed only when asked for; a
    rectified-flow schedule (SD3, Flux) takes only its own fields."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    flow = is_flow(base.class_name)
    fields = FLOW_TRAINING_FIELDS if flow else TRAINING_FIELDS
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        kind = f"{base.class_name} (rectified flow)" if flow else "this noise schedule"
        raise ConfigError(f"{source}: {unknown} cannot be set for training {kind}; the fields are {fields}.")
    if flow and "shift" in overrides and base.config.use_dynamic_shifting:
        raise ConfigError(f"{source}.shift: this scheduler shifts by the image size (use_dynamic_shifting), "
                          "so training draws unshifted levels and a fixed shift would not be used.")
    new_type = overrides.get("prediction_type", base.config.prediction_type)
    if new_type != base.config.prediction_type and not change_prediction_type:
        raise ConfigError(
            f"{source}.prediction_type={new_type!r}, but the model predicts {base.config.prediction_type!r}: "
            f"training it for another target changes what it outputs (a new objective, as SD 2's 768-v was). "
            f"Leave the field unset to train the checkpoint's own objective, or set "
            f"config.diffusion.change_prediction_type=True to retarget it.")
    config = dataclasses.replace(base.config, **overrides)
    config.validate(source)
    return Scheduler(config, base.class_name, base.explicit | frozenset(overrides))


def read_scheduler_config(path) -> Scheduler:
    """A checkpoint's `scheduler/scheduler_config.json` (a file or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "scheduler_config.json"
    raw = paths.read_json(path, missing="is missing: a diffusion checkpoint needs a scheduler config")
    class_name = raw.get("_class_name", "DDIMScheduler")
    explicit = frozenset(k for k in raw if not k.startswith("_"))
    return Scheduler(SchedulerConfig.from_dict(raw, str(path)), class_name, explicit)


def write_scheduler_config(scheduler: Scheduler, folder) -> None:
    """`folder/scheduler_config.json` as diffusers writes it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(scheduler.to_json_dict(), indent=2))


def train_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """alphas_cumprod of every training timestep, float32 as diffusers holds them."""
    if config.trained_betas is not None:
        b = np.asarray(config.trained_betas, dtype=np.float32)
    else:
        b = betas(config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end)
    if config.rescale_betas_zero_snr:
        b = rescale_zero_terminal_snr(b)
    return alphas_cumprod(b).astype(np.float32)
