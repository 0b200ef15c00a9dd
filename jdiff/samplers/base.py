"""What every sampler shares: the `Sampler` record (its plan and its update rule), the `Plan` that
knows which sampler made it, and the one `fori_loop` that runs any of them.

A plan is a pytree whose arrays have a fixed length (num_train_timesteps + 1) whatever the step
count, with the step count and the first step (image-to-image) as traced scalars; the sampler's
name and its scheduler settings ride along as static fields. So `sample(model_fn, x, plan, keys)`
needs nothing else, a new step count or strength is a new value for the compiled loop, and a new
sampler is a new program.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdiff.errors import ConfigError
from jdiff.schedules import SchedulerConfig, is_flow


@struct.dataclass
class Plan:
    """A sampling schedule made by `make_plan`."""

    arrays: dict  # what the update rule reads, each [L, ...] float32 (entries from num_steps on are padding)
    num_steps: Any  # int32 scalar: loop iterations (the step count, unless the sampler's loop_length differs)
    start: Any  # int32 scalar: the first step run (image-to-image skips the noisiest ones)
    stop: Any  # int32 scalar: the loop's end (num_steps, or earlier to hand off mid-way: denoising_end)
    init_noise_sigma: Any  # float32 scalar: scale of pure-noise starting latents
    eta: Any  # float32 scalar: DDIM's stochasticity (0 = deterministic)
    sampler: str = struct.field(pytree_node=False)  # the name of the Sampler whose rule runs it
    config: SchedulerConfig = struct.field(pytree_node=False)  # settings as that sampler's class reads them

    def __getattr__(self, name):  # plan.sigmas etc.: the rule's arrays read like fields
        arrays = self.__dict__.get("arrays")
        if arrays is not None and name in arrays:
            return arrays[name]
        raise AttributeError(name)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One sampler: how its plan is made on the host and how one step runs (traced).

    levels(config, n, **options) -> (arrays, init_noise_sigma): the rule's per-step arrays for n
      steps, numpy; options: what a pipeline passes to set_timesteps (flow: `mu`, `sigmas`).
    step(model_fn, x, i, plan, state, keys) -> (x, state): step i; `state` carries what multistep
      rules remember between steps (a pytree made by `init_state(x)`).
    add_noise(x0, noise, plan, i): x0 noised to the level of step i (image-to-image, inpainting).
    loop_length(config, n): iterations the loop runs for n steps (n, except where the reference
      calls the model more often than once per step, as PNDM does).
    """

    name: str
    scheduler_class: str  # the diffusers scheduler whose trajectory this reproduces
    levels: Callable
    step: Callable
    add_noise: Callable
    class_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # that class's own defaults
    forced: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # settings the name implies (or its class lacks)
    init_state: Callable = jnp.zeros_like
    loop_length: Callable = lambda config, n: n
    stochastic: bool = False  # draws noise at every step (needs per-image keys)
    description: str = ""


def img2img_start(num_steps: int, strength: float, flow: bool = False) -> int:
    """diffusers' `get_timesteps`: strength s runs the last int(N * s) of the N steps. The
    rectified-flow pipelines (SD3, Flux) skip int(N - N * s) steps instead, which runs one more step
    when N * s is not whole."""
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength must be in (0, 1], got {strength}.")
    if flow:
        start = int(max(num_steps - min(num_steps * strength, num_steps), 0))
    else:
        start = num_steps - min(int(num_steps * strength), num_steps)
    if start >= num_steps:
        raise ConfigError(f"strength {strength} with {num_steps} steps leaves no step to run; "
                          f"raise the strength or the step count.")
    return start


def _fraction(value, name: str) -> float:
    if not isinstance(value, (float, int, np.floating)) or not 0.0 < value < 1.0:
        raise ConfigError(f"{name} must be a fraction strictly between 0 and 1, got {value!r}.")
    return float(value)


def handoff_range(sampler: Sampler, timesteps: np.ndarray, t_count: int, start: int, denoising_start=None,
                  denoising_end=None) -> tuple[int, int]:
    """(first, end) loop iterations of a run that hands off part-way through the noise levels, as
    diffusers' SDXL pipelines cut their timestep list: `denoising_end` d keeps the steps whose
    timestep is >= round(T - d T) (the base model's part); `denoising_start` d starts at the first
    step below that (the refiner's part; it replaces image-to-image's strength).

    timesteps: the model timestep of each loop iteration; t_count: T, the training timesteps.
    """
    stop = len(timesteps)
    if denoising_start is None and denoising_end is None:
        return start, stop
    if sampler.name == "heun":  # diffusers cuts Heun's list of half-steps inside a step
        raise ConfigError("denoising_start / denoising_end split a run between two models; with Heun's "
                          "two-call steps the split falls inside a step. Use another sampler.")
    cutoff = lambda d, name: int(round(t_count - _fraction(d, name) * t_count))
    if denoising_start is not None:
        start = stop - int(np.sum(timesteps < cutoff(denoising_start, "denoising_start")))
    if denoising_end is not None:
        stop = int(np.sum(timesteps >= cutoff(denoising_end, "denoising_end")))
    if stop <= start:
        raise ConfigError(f"denoising_start {denoising_start} / denoising_end {denoising_end} leave no step "
                          f"of the {len(timesteps)} to run; raise the step count or widen the range.")
    return start, stop


def build_plan(sampler: Sampler, config: SchedulerConfig, num_steps: int, strength: float = 1.0,
               eta: float = 0.0, denoising_start=None, denoising_end=None, levels_options=None) -> Plan:
    """The plan of `sampler` for `num_steps` steps; `config` as the sampler's class reads it.

    strength < 1 starts part-way (image-to-image); denoising_start / denoising_end in (0, 1) start
    or stop at a fraction of the noise levels instead (the base/refiner hand-off, `handoff_range`).
    levels_options: what a family's pipeline passes to the scheduler's set_timesteps besides the
    step count (the flow samplers' `mu` and `sigmas`).
    """
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= config.num_train_timesteps:
        raise ConfigError(f"steps must be an integer in 1..{config.num_train_timesteps}, got {num_steps!r}.")
    start = img2img_start(num_steps, strength, is_flow(sampler.scheduler_class)) if denoising_start is None else 0
    config = config.as_read_by(sampler.scheduler_class)
    arrays, init = sampler.levels(config, int(num_steps), **(levels_options or {}))
    length = config.num_train_timesteps + 1

    def pad(v):
        v = np.asarray(v, np.float32)
        return np.pad(v, [(0, length - len(v))] + [(0, 0)] * (v.ndim - 1), mode="edge")

    iterations = sampler.loop_length(config, int(num_steps))
    start, stop = handoff_range(sampler, np.asarray(arrays["timesteps"][:iterations]), config.num_train_timesteps,
                                start, denoising_start, denoising_end)
    return Plan({k: pad(v) for k, v in arrays.items()}, np.int32(iterations), np.int32(start), np.int32(stop),
                np.float32(init), np.float32(eta), sampler.name, config)


def step_noise(keys, i, like):
    """Per-image standard normal noise for step i, from each image's own key."""
    if keys is None:
        raise ValueError("this sampler draws noise at every step: pass per-image PRNG keys.")
    draw = lambda key: jax.random.normal(jax.random.fold_in(key, i), like.shape[1:], like.dtype)
    return jax.vmap(draw)(keys)


def step_aware(model_fn):
    """Marks model_fn(x, t, step) as wanting the loop's step index (ControlNet's guidance window)."""
    model_fn.step_aware = True
    return model_fn


def run(sampler: Sampler, model_fn, x, plan: Plan, keys, known=None):
    """The loop of `sample`, with the sampler already looked up."""
    x = x.astype(jnp.float32)

    def body(i, carry):
        x, state = carry
        step_fn = functools.partial(model_fn, step=i) if getattr(model_fn, "step_aware", False) else model_fn
        x, state = sampler.step(step_fn, x, i, plan, state, keys)
        return keep_known(sampler, x, i, plan, known), state

    x, _ = jax.lax.fori_loop(plan.start, plan.stop, body, (x, sampler.init_state(x)))
    return x


def keep_known(sampler: Sampler, x, i, plan: Plan, known):
    """After step i, the region where known's mask == 0 replaced by its x0 noised to the new level
    (inpainting with an ordinary model, diffusers' blending); x unchanged when known is None."""
    if known is None:
        return x
    x0, mask, noise = known
    level = i + 1
    reference = jnp.where(level < plan.stop, sampler.add_noise(x0, noise, plan, level), x0)
    return (1 - mask) * reference + mask * x


def clip_x0(x0, config: SchedulerConfig):
    return jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range) if config.clip_sample else x0


def vp(sigma):
    """alpha_t, sigma_t of the variance-preserving sample whose k-diffusion noise level is sigma."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha
