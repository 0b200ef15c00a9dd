"""Linear multistep (LMS) as diffusers' LMSDiscreteScheduler runs it, in k-diffusion's scaling: the
step integrates the Lagrange polynomial through the last (up to four) ODE derivatives dx/dsigma
over the interval to the next sigma."""

import jax.numpy as jnp
import numpy as np

from jdiff.samplers.base import Sampler
from jdiff.samplers.karras import euler_levels, k_noise, k_x0

ORDER = 4  # diffusers' default `order` of step(), which pipelines never change


def lms_coefficients(sigmas, order=ORDER):
    """[n, order] weights of the derivatives at steps i, i-1, ... (zero past the order step i can
    use): the integral from sigma_i to sigma_{i+1} of each Lagrange basis polynomial on those
    steps' sigmas. Exact polynomial integration in float64 (diffusers uses numerical quadrature,
    exact for these cubics up to rounding), in a variable shifted to 0 at sigma_i."""
    s = np.asarray(sigmas, np.float64)
    weights = np.zeros((len(s) - 1, order))
    for i in range(len(s) - 1):
        nodes = s[i - np.arange(min(i + 1, order))] - s[i]
        for j, node in enumerate(nodes):
            others = np.delete(nodes, j)
            basis = np.atleast_1d(np.poly(others)) / np.prod(node - others)  # np.poly([]) is a scalar
            weights[i, j] = np.polyval(np.polyint(basis), s[i + 1] - s[i])
    return weights.astype(np.float32)


def _lms_levels(config, n):
    arrays, init = euler_levels(config, n)
    return {**arrays, "lms_coeffs": lms_coefficients(arrays["sigmas"])}, init


def _lms_step(model_fn, x, i, plan, history, keys):
    sigma = plan.sigmas[i]
    out = model_fn(x / ((sigma**2 + 1) ** 0.5), plan.timesteps[i]).astype(jnp.float32)
    derivative = (x - k_x0(out, x, sigma, plan.config)) / sigma
    history = jnp.concatenate([derivative[None], history[:-1]])  # newest first
    # summed newest first as diffusers does; entries not yet filled are zeros and add exactly 0
    weights = plan.lms_coeffs[i]
    update = weights[0] * history[0]
    for k in range(1, ORDER):
        update = update + weights[k] * history[k]
    return x + update, history


LMS = Sampler("lms", "LMSDiscreteScheduler", _lms_levels, _lms_step, k_noise,
              init_state=lambda x: jnp.zeros((ORDER,) + x.shape, x.dtype),
              class_defaults={"timestep_spacing": "linspace"},
              forced={"rescale_betas_zero_snr": False},  # not an LMSDiscreteScheduler setting: ignored as diffusers does
              description="linear multistep, order 4 (Karras sigmas if configured)")
