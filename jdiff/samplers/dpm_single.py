"""DPM-Solver++ singlestep (orders 1-3) as diffusers' DPMSolverSinglestepScheduler runs it.

Steps come in groups of 1, 2, 3, 1, 2, 3 ... (the class's order list, computed on the host into the
plan): a group starts at an anchor sample, its inner steps are first- and second-order moves whose
results are only used as model inputs, and its last step jumps from the anchor over the whole group
using every x0 estimate made inside it.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import schedules
from jdiff.samplers.base import Sampler, vp
from jdiff.samplers.dpm import dpm_noise
from jdiff.samplers.karras import train_sigmas
from jdiff.schedules import predicted_x0


def order_list(n, config):
    """The solver order of each of n steps. diffusers turns lower_order_final on by itself when n
    is not a multiple of the order or the schedule ends at sigma = 0, so only a whole last group
    with lower_order_final set, or a final sigma of zero, shortens the last step to first order."""
    orders = np.arange(n) % config.solver_order + 1
    if config.final_sigmas_type == "zero" or (config.lower_order_final and n % config.solver_order == 0):
        orders[-1] = 1
    return orders


def single_levels(config, n):
    """This class spaces timesteps only one way (linspace over the training range) and always
    rounds the timesteps of Karras sigmas."""
    train = train_sigmas(config)
    ts = np.linspace(0, config.num_train_timesteps - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if config.use_karras_sigmas:
        sigmas = schedules.karras_sigmas(train[0], train[-1], n)
        ts = schedules.sigma_to_timestep(sigmas, train).round()
    else:
        sigmas = np.interp(ts, np.arange(len(train)), train)
    last = train[0] if config.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.append(sigmas, last).astype(np.float32)
    return {"timesteps": ts.astype(np.float32), "sigmas": sigmas, "order": order_list(n, config)}, 1.0


def _lambda(sigma):
    alpha, sigma_t = vp(sigma)
    return alpha, sigma_t, jnp.log(alpha) - jnp.log(sigma_t)


def _first(plan, i, anchor, x0s):
    alpha_t, sigma_t, lambda_t = _lambda(plan.sigmas[i + 1])
    _, sigma_s, lambda_s = _lambda(plan.sigmas[i])
    h = lambda_t - lambda_s
    return (sigma_t / sigma_s) * anchor - (alpha_t * (jnp.exp(-h) - 1.0)) * x0s[0]


def _second(plan, i, anchor, x0s):
    """From the anchor at step i-1 to step i+1, with the estimates at i-1 and i."""
    alpha_t, sigma_t, lambda_t = _lambda(plan.sigmas[i + 1])
    lambda_s0 = _lambda(plan.sigmas[i])[2]
    _, sigma_s1, lambda_s1 = _lambda(plan.sigmas[i - 1])
    m0, m1 = x0s[0], x0s[1]
    h, h_0 = lambda_t - lambda_s1, lambda_s0 - lambda_s1
    d1 = (1.0 / (h_0 / h)) * (m0 - m1)
    step = (sigma_t / sigma_s1) * anchor - (alpha_t * (jnp.exp(-h) - 1.0)) * m1
    if plan.config.solver_type == "midpoint":
        return step - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
    return step + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1


def _third(plan, i, anchor, x0s):
    """From the anchor at step i-2 to step i+1, with the estimates at i-2, i-1 and i."""
    alpha_t, sigma_t, lambda_t = _lambda(plan.sigmas[i + 1])
    lambda_s0 = _lambda(plan.sigmas[i])[2]
    lambda_s1 = _lambda(plan.sigmas[i - 1])[2]
    _, sigma_s2, lambda_s2 = _lambda(plan.sigmas[i - 2])
    m0, m1, m2 = x0s
    h, h_0, h_1 = lambda_t - lambda_s2, lambda_s0 - lambda_s2, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
    step = (sigma_t / sigma_s2) * anchor - (alpha_t * (jnp.exp(-h) - 1.0)) * m2
    phi_2 = alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)
    if plan.config.solver_type == "midpoint":
        return step + phi_2 * d1_1
    d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
    return step + phi_2 * d1 - (alpha_t * ((jnp.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2


def _single_step(model_fn, x, i, plan, state, keys):
    config = plan.config
    alpha, sigma = vp(plan.sigmas[i])
    out = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
    x0s = (predicted_x0(out, x, alpha, sigma, config.prediction_type),) + state["x0s"]
    # image-to-image may start inside a group: its order drops to the estimates made so far
    order = jnp.minimum(plan.order[i].astype(jnp.int32), i - plan.start + 1)
    anchor = jnp.where(order == 1, x, state["anchor"])
    updates = (_first, _second, _third)[:config.solver_order]
    x_next = jax.lax.switch(order - 1, [lambda u=u: u(plan, i, anchor, x0s) for u in updates])
    return x_next, {"x0s": x0s[:2], "anchor": anchor}


def single_state(x):
    return {"x0s": (jnp.zeros_like(x),) * 2, "anchor": jnp.zeros_like(x)}


DPM_SINGLE = Sampler("dpm++_single", "DPMSolverSinglestepScheduler", single_levels, _single_step, dpm_noise,
                     class_defaults={"lower_order_final": False},
                     # the class has no spacing or zero-SNR options: whatever the file says, it ignores them
                     forced={"algorithm_type": "dpmsolver++", "timestep_spacing": "linspace", "steps_offset": 0,
                             "rescale_betas_zero_snr": False},
                     init_state=single_state,
                     description="DPM-Solver++ singlestep (solver_order 1-3 and Karras sigmas from the config)")
