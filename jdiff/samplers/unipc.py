"""UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler runs it on x0 estimates
(predict_x0): a multistep predictor (UniP) of order up to 3, and after every model call a corrector
(UniC) that redoes the previous step with the new estimate included, at no extra model call.

Both updates are exponential integrators in lambda = log(alpha / sigma): the first-order part is
DPM-Solver++'s, and the higher-order part weights the divided differences of earlier estimates by
coefficients `rhos` that solve UniPC's order conditions (a small linear system in the step ratios).
The order of each step is traced (warm-up after the first step run, lower_order_final near the end),
so each order is a branch of a `lax.switch`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import schedules
from jdiff.errors import ConfigError
from jdiff.samplers.base import Sampler, vp
from jdiff.samplers.dpm import dpm_noise, dpm_timesteps
from jdiff.samplers.karras import train_sigmas
from jdiff.schedules import predicted_x0

HISTORY = 3  # x0 estimates kept: the corrector of order 3 reaches three steps back


def _check(config):
    # diffusers divides by a zero step at sigma = 0 in these cases and returns NaN or inf latents
    if config.final_sigmas_type != "zero":
        return
    if config.solver_type == "bh1":
        raise ConfigError("UniPC with solver_type 'bh1' and final_sigmas_type 'zero' ends in NaN in diffusers; "
                          "use solver_type 'bh2' or final_sigmas_type 'sigma_min'.")
    if not config.lower_order_final and config.solver_order > 1:
        raise ConfigError("UniPC with lower_order_final off and final_sigmas_type 'zero' ends in inf in "
                          "diffusers; turn lower_order_final on or use final_sigmas_type 'sigma_min'.")


def unipc_levels(config, n):
    """Timesteps and sigmas as the UniPC class spaces them, and each step's predictor order
    before warm-up (lower_order_final caps it by the steps left)."""
    _check(config)
    ts = dpm_timesteps(config, n)
    train = train_sigmas(config)
    if config.use_karras_sigmas:
        sigmas = schedules.karras_sigmas(train[0], train[-1], n)
        ts = schedules.sigma_to_timestep(sigmas, train).round()
        last = sigmas[-1]  # this class ends at the last Karras level, not at the training minimum
    else:
        sigmas = np.interp(ts, np.arange(len(train)), train)
        last = train[0]
    sigmas = np.append(sigmas, last if config.final_sigmas_type == "sigma_min" else 0.0).astype(np.float32)
    left = n - np.arange(n)
    order = np.minimum(config.solver_order, left) if config.lower_order_final else np.full(n, config.solver_order)
    return {"timesteps": ts.astype(np.float32), "sigmas": sigmas, "order": order}, 1.0


def _log_snr(sigma):
    alpha, sigma_t = vp(sigma)
    return alpha, sigma_t, jnp.log(alpha) - jnp.log(sigma_t)


def _order_terms(h, k, solver_type):
    """h*phi_1(-h), B(h) and the right-hand side b_1..b_k of the order conditions, where phi_n are
    the exponential integrator's phi functions of the (negated, x0-form) step."""
    hh = -h
    h_phi_1 = jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if solver_type == "bh1" else jnp.expm1(hh)
    b, factorial = [], 1
    for n in range(1, k + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= n + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, jnp.stack(b)


def _uni_update(plan, x, target, base, x0s, k, new_x0=None):
    """One UniP step (new_x0 None) or UniC step of order k from sigma index `base` to `target`.
    x0s[j]: the estimate at index base - j. The corrector also weighs in `new_x0`, the estimate
    at `target`, with the last coefficient of the full k x k system."""
    alpha_t, sigma_t, lambda_t = _log_snr(plan.sigmas[target])
    _, sigma_s0, lambda_s0 = _log_snr(plan.sigmas[base])
    h = lambda_t - lambda_s0
    m0 = x0s[0]
    ratios, diffs = [], []
    for j in range(1, k):
        rk = (_log_snr(plan.sigmas[base - j])[2] - lambda_s0) / h
        ratios.append(rk)
        diffs.append((x0s[j] - m0) / rk)
    rks = jnp.stack(ratios + [jnp.ones((), jnp.float32)])
    system = jnp.stack([rks**n for n in range(k)])
    h_phi_1, b_h, b = _order_terms(h, k, plan.config.solver_type)
    first = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    if new_x0 is None:
        if k == 1:
            return first
        rhos = jnp.full((1,), 0.5) if k == 2 else jnp.linalg.solve(system[:-1, :-1], b[:-1])
        return first - alpha_t * b_h * _weighted(rhos, diffs)
    rhos = jnp.full((1,), 0.5) if k == 1 else jnp.linalg.solve(system, b)
    correction = rhos[-1] * (new_x0 - m0)
    if k > 1:
        correction = _weighted(rhos[:-1], diffs) + correction
    return first - alpha_t * b_h * correction


def _weighted(rhos, diffs):
    total = rhos[0] * diffs[0]
    for rho, d in zip(rhos[1:], diffs[1:]):
        total = total + rho * d
    return total


def _unipc_step(model_fn, x, i, plan, state, keys):
    config = plan.config
    alpha, sigma = vp(plan.sigmas[i])
    out = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
    x0 = predicted_x0(out, x, alpha, sigma, config.prediction_type)
    history = state["x0s"]  # estimates at i-1, i-2, i-3

    # UniC: redo the previous step from its (corrected) start with this step's estimate; branch 0
    # is the first step run, which has nothing to correct
    def corrector(k):
        return lambda: _uni_update(plan, state["last"], i, i - 1, history, k, new_x0=x0)

    branches = [lambda: x] + [corrector(k) for k in range(1, config.solver_order + 1)]
    x = jax.lax.switch(state["order"], branches)

    # UniP from the corrected sample; warm-up: order at most the number of estimates so far
    history = (x0,) + history[:-1]
    order = jnp.minimum(plan.order[i].astype(jnp.int32), i - plan.start + 1)
    predictors = [lambda k=k: _uni_update(plan, x, i + 1, i, history, k) for k in range(1, config.solver_order + 1)]
    x_next = jax.lax.switch(order - 1, predictors)
    return x_next, {"x0s": history, "last": x, "order": order}


def unipc_state(x):
    zero = jnp.zeros_like(x)
    return {"x0s": (zero,) * HISTORY, "last": zero, "order": jnp.zeros((), jnp.int32)}


UNIPC = Sampler("unipc", "UniPCMultistepScheduler", unipc_levels, _unipc_step, dpm_noise,
                class_defaults={"timestep_spacing": "linspace", "solver_type": "bh2", "lower_order_final": True},
                init_state=unipc_state,
                description="UniPC multistep predictor-corrector (solver_type bh1/bh2, solver_order 1-3 "
                            "and Karras sigmas from the config)")
