"""Samplers as pure functions: the reverse diffusion as one `lax.fori_loop`, ready to sit in a jit.

    plan = make_plan("dpm++2m", scheduler_config, steps, explicit=fields)   # host, numpy
    x = initial_latents(noise, plan)                                        # or noised_latents(x0, noise, plan)
    latents = sample(model_fn, x, plan, keys)                               # traced

- `model_fn(x_in, t) -> output`: the denoiser (U-Net plus guidance), given the model input and a
  scalar timestep, returning an output of the scheduler's prediction type (velocity for flows);
- the plan knows its sampler and the scheduler settings as that sampler's diffusers class reads
  them; its arrays have a fixed length and the step count and first step are traced scalars;
- `keys`: per-image PRNG keys `[B]` for the stochastic samplers (each image's noise depends only
  on its own key, so results do not change with batch composition or device count).

Plans are computed on the host in numpy exactly as diffusers' schedulers compute theirs, and each
update is written in the reference's operation order, so trajectories agree to float32 rounding.
One module per kind of update: `vp` (DDIM, DDPM, LCM), `karras` (Euler), `dpm` (DPM-Solver++ 2M),
`dpm_sde` (DPM-Solver++ 2M SDE), `dpm_single` (DPM-Solver++ singlestep, orders 1-3), `unipc`
(UniPC predictor-corrector; bh1/bh2 and orders 1-3 come from the config), `pndm` (PNDM/PLMS),
`lms` (linear multistep), `heun` (Heun, two model calls per step), `flow` (rectified flow).
"""

from jdiff.errors import ConfigError
from jdiff.samplers.base import Plan, Sampler, build_plan, img2img_start, run, step_aware, step_noise
from jdiff.samplers.differentiable import run_differentiable
from jdiff.samplers.dpm import DPM_2M, DPM_2M_KARRAS
from jdiff.samplers.dpm_sde import DPM_2M_SDE, DPM_2M_SDE_KARRAS
from jdiff.samplers.dpm_single import DPM_SINGLE
from jdiff.samplers.flow import FLOW_EULER
from jdiff.samplers.heun import HEUN
from jdiff.samplers.karras import EULER, EULER_ANCESTRAL
from jdiff.samplers.lms import LMS
from jdiff.samplers.pndm import PNDM
from jdiff.samplers.unipc import UNIPC
from jdiff.samplers.vp import DDIM, DDPM, LCM
from jdiff.schedules import SchedulerConfig, is_flow

REGISTRY = {s.name: s for s in (DDIM, DDPM, EULER, EULER_ANCESTRAL, DPM_2M, DPM_2M_KARRAS, DPM_2M_SDE,
                                 DPM_2M_SDE_KARRAS, DPM_SINGLE, UNIPC, PNDM, LMS, HEUN, LCM, FLOW_EULER)}
SAMPLERS = tuple(REGISTRY)


def get(name: str) -> Sampler:
    if name not in REGISTRY:
        raise ConfigError(f"unknown sampler {name!r}; valid samplers are: {', '.join(SAMPLERS)}.")
    return REGISTRY[name]


def check_sampler(name: str, scheduler_class: str | None = None) -> None:
    """A known sampler, and with `scheduler_class` (the checkpoint's) one that solves the same kind
    of process: a flow-matching model (SD3, Flux) needs a flow sampler, a noise-schedule model
    (SD 1.x/2.x, SDXL) one of the others."""
    sampler = get(name)
    if scheduler_class is None or is_flow(sampler.scheduler_class) == is_flow(scheduler_class):
        return
    fitting = [s.name for s in REGISTRY.values() if is_flow(s.scheduler_class) == is_flow(scheduler_class)]
    kind = "a rectified-flow" if is_flow(scheduler_class) else "a noise-schedule (not rectified-flow)"
    raise ConfigError(f"sampler {name!r} does not fit this checkpoint: its scheduler {scheduler_class} is "
                      f"{kind} scheduler; use one of {', '.join(fitting)}.")


def sampler_config(name: str, config: SchedulerConfig, explicit: frozenset = frozenset()) -> SchedulerConfig:
    """`config` (a checkpoint's scheduler settings, `explicit` the fields it set) as the diffusers
    scheduler class behind sampler `name` would read it."""
    sampler = get(name)
    config = config.for_sampler(sampler.class_defaults, explicit)
    return config.for_sampler(sampler.forced, frozenset()).as_read_by(sampler.scheduler_class)


def make_plan(name: str, config: SchedulerConfig, num_steps: int, strength: float = 1.0, eta: float = 0.0,
              explicit: frozenset | None = None, denoising_start=None, denoising_end=None,
              levels_options=None) -> Plan:
    """The schedule of sampler `name` for `num_steps` steps, as numpy arrays of a fixed length.

    `config`: the checkpoint's scheduler settings; with `explicit` (the fields its file sets) they
    are first read as the sampler's diffusers class would (`sampler_config`), otherwise taken as
    already read. `strength` < 1 starts part-way (image-to-image); `denoising_start` /
    `denoising_end` (fractions of the noise levels, diffusers' SDXL base/refiner hand-off) start or
    stop the loop at the step where the timesteps cross that fraction.
    """
    sampler = get(name)
    config = config.for_sampler(sampler.class_defaults, explicit) if explicit is not None else config
    return build_plan(sampler, config.for_sampler(sampler.forced, frozenset()), num_steps, strength, eta,
                      denoising_start, denoising_end, levels_options)



def initial_latents(noise, plan: Plan):
    """Starting latents of text-to-image: pure noise at the sampler's initial scale."""
    return noise * plan.init_noise_sigma


def noised_latents(x0, noise, plan: Plan, level=None):
    """`x0` noised to the level of step `level` (default: the plan's first step), as diffusers'
    `scheduler.add_noise` does for image-to-image."""
    return get(plan.sampler).add_noise(x0, noise, plan, plan.start if level is None else level)


def sample(model_fn, x, plan: Plan, keys=None, known=None):
    """Runs the plan's sampler from `x` over its steps `start..stop-1`; returns the latents.

    known: optional `(x0, mask, noise)` for inpainting with an ordinary model: after every step the
    region where mask == 0 is replaced by `x0` noised to the new level (diffusers' blending).
    """
    return run(get(plan.sampler), model_fn, x, plan, keys, known)


def sample_differentiable(model_fn, params, x, plan: Plan, keys=None, known=None, *, max_steps: int,
                          grad_steps: int | None = None, remat: bool = True):
    """`sample` as a loop that reverse-mode autodiff passes (samplers/differentiable.py):
    model_fn(params, x_in, t, step), with `params` every value the gradient should reach; a scan of
    `max_steps` (static) whatever the plan's step count; grad_steps=K backpropagates through the
    last K steps only (DRaFT-K); remat recomputes each step's activations in the backward pass."""
    return run_differentiable(get(plan.sampler), model_fn, params, x, plan, keys, known, max_steps=max_steps,
                              grad_steps=grad_steps, remat=remat)


def for_scheduler(class_name: str, config: SchedulerConfig) -> str:
    """The sampler that runs what a checkpoint's `scheduler_config.json` names (`_class_name`), as
    diffusers' `pipe(prompt)` would with that scheduler."""
    if class_name == "DPMSolverMultistepScheduler":
        if config.solver_order != 2:
            raise ConfigError(f"DPMSolverMultistepScheduler with solver_order {config.solver_order}: jdiff runs "
                              f"it at order 2 only; pass sampler= one of {', '.join(SAMPLERS)}.")
        sde = "_sde" if config.algorithm_type == "sde-dpmsolver++" else ""
        return f"dpm++2m{sde}_karras" if config.use_karras_sigmas else f"dpm++2m{sde}"
    if class_name == "DPMSolverSinglestepScheduler" and config.algorithm_type != "dpmsolver++":
        raise ConfigError(f"DPMSolverSinglestepScheduler with algorithm_type {config.algorithm_type!r}: jdiff runs "
                          f"it with dpmsolver++ only; pass sampler= one of {', '.join(SAMPLERS)}.")
    for sampler in REGISTRY.values():
        if sampler.scheduler_class == class_name and not sampler.forced:
            return sampler.name
    for sampler in REGISTRY.values():
        if sampler.scheduler_class == class_name:
            return sampler.name
    classes = sorted({s.scheduler_class for s in REGISTRY.values()})
    raise ConfigError(f"the checkpoint's scheduler {class_name!r} is not one jdiff can run; pass sampler= one of "
                      f"{', '.join(SAMPLERS)} (the schedulers jdiff reproduces: {', '.join(classes)}).")
