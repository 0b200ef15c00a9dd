"""PNDM as diffusers' PNDMScheduler runs it: pseudo linear multistep (PLMS, Liu et al. 2022), a
fourth-order Adams-Bashforth combination of the last four noise estimates fed to the DDIM-like
transfer x_t -> x_prev, after a warm-up that fills that history.

Two warm-ups, as the class has them:
- skip_prk_steps=True (what SD 1.x checkpoints ship): lower-order Adams-Bashforth, with one extra
  model call at the start (diffusers lists the second timestep twice: the first step is redone
  with the average of two noise estimates);
- skip_prk_steps=False: three pseudo Runge-Kutta steps of four model calls each.

So diffusers calls the model more often than once per step, and one loop iteration here is one of
its calls: the loop runs over its whole timestep list (n + 1 entries, or n + 9 with PRK). Its
`counter` is our i - start, since image-to-image slices the list but starts the counter at 0.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import schedules
from jdiff.errors import ConfigError
from jdiff.samplers.base import Sampler
from jdiff.samplers.vp import vp_noise

PRK_CALLS = 12  # three Runge-Kutta steps, four model calls each
HISTORY = 4  # noise estimates PLMS combines


def pndm_timesteps(config, n):
    """diffusers' list of model timesteps, the Runge-Kutta part of it (empty if skipped), and the
    nominal stride N // n that PNDM steps by whatever the spacing."""
    t_count = config.num_train_timesteps
    down = schedules.timesteps(n, t_count, config.timestep_spacing, config.steps_offset)  # highest first
    stride = t_count // n
    if config.skip_prk_steps:
        return np.concatenate([down[:2], down[1:]]), np.zeros(0, np.int64), stride
    if not 4 <= n <= t_count - 8:
        raise ConfigError(f"PNDM with its Runge-Kutta warm-up (skip_prk_steps=False) takes 4..{t_count - 8} "
                          f"steps, got {n}; set skip_prk_steps=True for other step counts.")
    half = stride // 2
    # each Runge-Kutta step from u to v evaluates at u, twice at the midpoint v + half, then at v
    prk = np.concatenate([[u, v + half, v + half, v] for u, v in zip(down[:3], down[1:4])])
    return np.concatenate([prk, down[3:]]), prk, stride


def _pndm_levels(config, n):
    if config.prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(f"PNDM takes prediction_type epsilon or v_prediction, got {config.prediction_type!r}.")
    ts, prk, stride = pndm_timesteps(config, n)
    a = schedules.train_alphas_cumprod(config)
    final = np.float32(1.0) if config.set_alpha_to_one else a[0]

    def level(t):  # alpha_bar at timesteps t; below 0 is the level after the last step
        return np.where(t >= 0, a[np.clip(t, 0, len(a) - 1)], final).astype(np.float32)

    arrays = {"timesteps": ts.astype(np.float32), "alpha_bar": level(ts), "alpha_bar_next": level(ts - stride)}
    if config.skip_prk_steps:
        # diffusers' second call redoes the first step as if from t + stride (only reached at i >= 1,
        # where t + stride stays in range; the clip only touches the unused entry 0)
        arrays["alpha_bar_back"] = level(ts + stride)
    else:
        arrays["alpha_bar_half"] = level(ts - stride // 2)  # the even calls of a Runge-Kutta step
        arrays["prk_alpha_bar"] = level(prk[np.arange(PRK_CALLS) // 4 * 4])  # each call's step start
    return arrays, 1.0


def _loop_length(config, n):
    return len(pndm_timesteps(config, n)[0])


def _transfer(x, eps, a, a_prev, prediction_type):
    """PNDM's formula (9): x at alpha_bar a to alpha_bar a_prev given a noise estimate."""
    b, b_prev = 1 - a, 1 - a_prev
    if prediction_type == "v_prediction":
        eps = a**0.5 * eps + b**0.5 * x
    denom = a * b_prev**0.5 + (a * b * a_prev) ** 0.5
    return (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom


def _push(history, e):
    return jnp.concatenate([history[1:], e[None]])  # newest last


def _adams_bashforth(h, order):
    """The PLMS combination of the newest `order` entries of history h (newest last)."""
    rules = [
        lambda h: h[3],
        lambda h: (3 * h[3] - h[2]) / 2,
        lambda h: (23 * h[3] - 16 * h[2] + 5 * h[1]) / 12,
        lambda h: (1 / 24) * (55 * h[3] - 59 * h[2] + 37 * h[1] - 9 * h[0]),
    ]
    return jax.lax.switch(order - 1, rules, h)


def _plms_only(e, x, i, c, plan, state):
    """skip_prk_steps: counter 0 takes an Euler-like step and keeps x; counter 1 (the repeated
    timestep) redoes it from the kept x with the mean of both estimates, without adding the second
    to the history; from counter 2 on the order grows with the history, up to 4."""
    history, kept, acc = state
    redo = c == 1
    history = jnp.where(redo, history, _push(history, e))
    kept = jnp.where(c == 0, x, kept)
    order = jnp.clip(c, 1, HISTORY)  # counter 0: just the one estimate
    eps = jnp.where(redo, (e + history[3]) / 2, _adams_bashforth(history, order))
    a = jnp.where(redo, plan.alpha_bar_back[i], plan.alpha_bar[i])
    a_prev = jnp.where(redo, plan.alpha_bar[i], plan.alpha_bar_next[i])
    return jnp.where(redo, kept, x), eps, a, a_prev, (history, kept, acc)


def _prk_then_plms(e, x, i, c, plan, state):
    """Counters 0..11: Runge-Kutta calls, each moving the step's start sample; the fourth call of a
    step uses the 1/6, 1/3, 1/3, 1/6 mix and only the first call's estimate enters the history.
    From counter 12 on: fourth-order PLMS."""
    history, kept, acc = state
    rk = c < PRK_CALLS
    phase = c % 4
    first = jnp.logical_and(rk, phase == 0)
    history = jnp.where(jnp.logical_or(first, ~rk), _push(history, e), history)
    kept = jnp.where(first, x, kept)
    term = jnp.where(jnp.logical_or(phase == 0, phase == 3), 1 / 6, 1 / 3) * e
    mixed = jnp.where(phase == 0, term, acc + term)
    acc = jnp.where(phase == 3, 0.0, mixed)
    eps = jnp.where(rk, jnp.where(phase == 3, mixed, e), _adams_bashforth(history, HISTORY))
    a = jnp.where(rk, plan.prk_alpha_bar[jnp.minimum(c, PRK_CALLS - 1)], plan.alpha_bar[i])
    rk_prev = jnp.where(phase % 2 == 1, plan.alpha_bar[i], plan.alpha_bar_half[i])
    a_prev = jnp.where(rk, rk_prev, plan.alpha_bar_next[i])
    return jnp.where(rk, kept, x), eps, a, a_prev, (history, kept, acc)


def _pndm_step(model_fn, x, i, plan, state, keys):
    e = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
    rule = _plms_only if plan.config.skip_prk_steps else _prk_then_plms
    start, eps, a, a_prev, state = rule(e, x, i, i - plan.start, plan, state)
    return _transfer(start, eps, a, a_prev, plan.config.prediction_type), state


def _init_state(x):
    """History of noise estimates (newest last), the sample a warm-up step started from, and the
    running Runge-Kutta mix."""
    return jnp.zeros((HISTORY,) + x.shape, x.dtype), jnp.zeros_like(x), jnp.zeros_like(x)


PNDM = Sampler("pndm", "PNDMScheduler", _pndm_levels, _pndm_step, vp_noise, init_state=_init_state,
               loop_length=_loop_length, class_defaults={"set_alpha_to_one": False},
               forced={"rescale_betas_zero_snr": False},  # not a PNDMScheduler setting: ignored as diffusers does
               description="PNDM / PLMS (SD 1.x's default scheduler)")
