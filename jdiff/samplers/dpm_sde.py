"""DPM-Solver++ (2M) SDE as diffusers' DPMSolverMultistepScheduler runs it with
algorithm_type="sde-dpmsolver++": the 2M update of the stochastic differential equation, which
shrinks the sample by an extra exp(-h), leans twice as hard on the x0 estimate and adds fresh
noise of standard deviation sigma_t * sqrt(1 - exp(-2h)) at every step."""

import jax.numpy as jnp

from jdiff.samplers.base import Sampler, step_noise
from jdiff.samplers.dpm import dpm_levels, dpm_noise, multistep_levels, use_first_order
from jdiff.schedules import predicted_x0


def _sde_step(model_fn, x, i, plan, previous_x0, keys):
    config = plan.config
    (alpha_s0, sigma_s0), (alpha_t, sigma_t), h, h_0 = multistep_levels(plan, i)
    out = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
    x0 = predicted_x0(out, x, alpha_s0, sigma_s0, config.prediction_type)
    # at the last step sigma_t = 0 makes h infinite: the update returns x0 and the noise term vanishes
    decay = sigma_t / sigma_s0 * jnp.exp(-h)
    gain = alpha_t * (1 - jnp.exp(-2.0 * h))
    noise = sigma_t * jnp.sqrt(1.0 - jnp.exp(-2 * h)) * step_noise(keys, i, x)
    first = decay * x + gain * x0 + noise
    first_order = use_first_order(i, plan)
    # where the step is first order h_0 / h may be 0 or infinite: an unused value, but its infinite
    # derivative would turn the gradient through the other branch of the `where` into NaN
    d1 = (1.0 / jnp.where(first_order, 1.0, h_0 / h)) * (x0 - previous_x0)
    if config.solver_type == "midpoint":
        second = decay * x + gain * x0 + 0.5 * gain * d1 + noise
    else:  # heun: the phi_2 weight of the SDE step
        second = decay * x + gain * x0 + (alpha_t * ((1.0 - jnp.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1 + noise
    return jnp.where(first_order, first, second), x0


_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
DPM_2M_SDE = Sampler("dpm++2m_sde", "DPMSolverMultistepScheduler", dpm_levels, _sde_step, dpm_noise,
                     class_defaults={"timestep_spacing": "linspace"}, forced={**_SDE, "use_karras_sigmas": False},
                     stochastic=True, description="DPM-Solver++ 2M SDE")
DPM_2M_SDE_KARRAS = Sampler("dpm++2m_sde_karras", "DPMSolverMultistepScheduler", dpm_levels, _sde_step, dpm_noise,
                            class_defaults={"timestep_spacing": "linspace"},
                            forced={**_SDE, "use_karras_sigmas": True}, stochastic=True,
                            description="DPM-Solver++ 2M SDE with Karras sigmas")
