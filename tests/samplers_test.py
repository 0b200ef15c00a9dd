"""Each sampler's trajectory equals the diffusers scheduler's on the same model function and noise.

The model is a smooth nonlinear function of (x, t), written identically in torch and JAX. Every model
input along the way (the trajectory) and the final latents are compared. Stochastic samplers get
the same injected noise: diffusers' `randn_tensor` is patched to return jdiff's per-step noise.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import diffusers

from jdiff import samplers
from jdiff.errors import ConfigError
from jdiff.schedules import SchedulerConfig

REFERENCE = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "dpm++2m_karras": "DPMSolverMultistepScheduler",
    "dpm++2m_sde": "DPMSolverMultistepScheduler",
    "dpm++2m_sde_karras": "DPMSolverMultistepScheduler",
    "dpm++_single": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}
MODULE = {
    "DDIMScheduler": "scheduling_ddim",
    "DDPMScheduler": "scheduling_ddpm",
    "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
    "LCMScheduler": "scheduling_lcm",
    "DPMSolverMultistepScheduler": "scheduling_dpmsolver_multistep",
}
# settings each sampler name implies, given to the diffusers class as a pipeline user would
IMPLIED = {
    "dpm++2m": {"use_karras_sigmas": False},
    "dpm++2m_karras": {"use_karras_sigmas": True},
    "dpm++2m_sde": {"use_karras_sigmas": False, "algorithm_type": "sde-dpmsolver++"},
    "dpm++2m_sde_karras": {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
}
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False,
          set_alpha_to_one=False, timestep_spacing="leading")
SHAPE = (2, 4, 6, 3)  # NHWC latents


def model(x, t, xp):
    """A denoiser that behaves like a real one (its clean-sample estimates stay bounded at every
    noise level): the exact noise estimate for unit-Gaussian data, plus a nonlinear term."""
    s = (1 - xp.exp(-5.4 * (t / 1000) ** 1.5)) ** 0.5
    return s * x + 0.1 * s * xp.tanh(2 * x) * xp.cos(t / 300)


def model_torch(x, t):
    return model(x, torch.as_tensor(t, dtype=torch.float32), torch)


def model_jax(x, t):
    return model(x, jnp.asarray(t, jnp.float32), jnp)


def run_diffusers(name, raw_config, steps, noise, keys, strength=1.0, eta=0.0, monkeypatch=None):
    cls_name = REFERENCE[name]
    scheduler = getattr(diffusers, cls_name).from_config({**raw_config, **IMPLIED.get(name, {})})
    scheduler.set_timesteps(steps)
    start = samplers.img2img_start(steps, strength)
    # as the pipelines' get_timesteps: a second-order scheduler lists `order` entries per step
    begin = start * getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    current = {}
    if monkeypatch is not None:  # inject jdiff's noise for step i
        def randn(shape, **kwargs):
            nhwc = samplers.step_noise(keys, current["i"], jnp.zeros(SHAPE))
            return torch.from_numpy(np.asarray(nhwc).copy())
        monkeypatch.setattr(importlib.import_module(f"diffusers.schedulers.{MODULE[cls_name]}"), "randn_tensor", randn)
    x = torch.from_numpy(noise.copy())
    if start == 0:
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    inputs = []
    kwargs = {"eta": eta} if name == "ddim" else {}
    for i, t in enumerate(timesteps):
        current["i"] = start + i
        x_in = scale(x, t)
        inputs.append((x_in.numpy().copy(), float(t)))
        x = scheduler.step(model_torch(x_in, t), t, x, **kwargs).prev_sample
    return inputs, x.numpy()


_RECORDED = []  # the model inputs of the current `_run`, in call order


def _recording_model(x_in, t):
    jax.debug.callback(lambda a, b: _RECORDED.append((np.asarray(a), float(b))), x_in, t, ordered=True)
    return model_jax(x_in, t)


@functools.partial(jax.jit, static_argnames="from_noise")
def _run(noise, plan, keys, from_noise):
    # image-to-image starts from given latents (here the noise itself), text-to-image from noise at
    # the sampler's initial scale
    x = samplers.initial_latents(noise, plan) if from_noise else noise
    return samplers.sample(_recording_model, x, plan, keys)


def run_jdiff(name, raw_config, steps, noise, keys, strength=1.0, eta=0.0):
    """(model inputs, final latents) of jdiff's sampler. One module-level jit: cases that differ
    only in traced values (step count, strength, eta) reuse one compiled loop, as generate() does;
    the recording callback keeps these programs out of the persistent cache."""
    plan = samplers.make_plan(name, SchedulerConfig.from_dict(raw_config), steps, strength=strength, eta=eta,
                              explicit=frozenset(raw_config))
    jax.effects_barrier()
    _RECORDED.clear()
    out = np.asarray(_run(jnp.asarray(noise), plan, keys, from_noise=strength >= 1))
    jax.effects_barrier()
    inputs = list(_RECORDED)
    _RECORDED.clear()
    return inputs, out


def assert_same_trajectory(ours, reference, atol=1e-5):
    (ours_inputs, ours_out), (ref_inputs, ref_out) = ours, reference
    assert len(ours_inputs) == len(ref_inputs)
    for step, ((x, t), (rx, rt)) in enumerate(zip(ours_inputs, ref_inputs)):
        assert t == pytest.approx(rt, abs=1e-4), f"step {step}: timestep {t} vs {rt}"
        np.testing.assert_allclose(x, rx, rtol=0, atol=atol, err_msg=f"model input at step {step}")
    np.testing.assert_allclose(ours_out, ref_out, rtol=0, atol=atol)


CASES = [
    ("ddim", SD, 10),
    ("ddim", {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
              "rescale_betas_zero_snr": True}, 7),
    ("ddim", {**SD, "prediction_type": "sample", "clip_sample": True, "timestep_spacing": "linspace"}, 6),
    ("euler", SD, 10),
    ("euler", {**SD, "use_karras_sigmas": True, "timestep_spacing": "linspace"}, 8),
    ("euler", {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 6),
    ("dpm++2m", SD, 10),
    ("dpm++2m", {**SD, "timestep_spacing": "linspace"}, 16),
    ("dpm++2m", {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                 "rescale_betas_zero_snr": True, "final_sigmas_type": "zero"}, 8),
    ("dpm++2m", {**SD, "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 7),
    ("dpm++2m_karras", SD, 12),
    ("flow_euler", {"shift": 3.0}, 9),
    ("flow_euler", {}, 4),
]


@pytest.mark.parametrize("name,raw,steps", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_deterministic_trajectories_match_diffusers(name, raw, steps):
    noise = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), SHAPE[0])
    assert_same_trajectory(run_jdiff(name, raw, steps, noise, keys), run_diffusers(name, raw, steps, noise, keys))


STOCHASTIC = [
    ("ddim", SD, 8, 0.7),
    ("ddpm", SD, 12, 0.0),
    ("ddpm", {**SD, "prediction_type": "v_prediction", "variance_type": "fixed_large",
              "timestep_spacing": "trailing"}, 5, 0.0),
    ("euler_a", SD, 9, 0.0),
    ("lcm", {**SD, "timestep_spacing": "leading"}, 4, 0.0),
    ("lcm", {**SD, "prediction_type": "v_prediction"}, 1, 0.0),
]


@pytest.mark.parametrize("name,raw,steps,eta", STOCHASTIC, ids=[f"{c[0]}-{i}" for i, c in enumerate(STOCHASTIC)])
def test_stochastic_trajectories_match_diffusers_given_the_same_noise(name, raw, steps, eta, monkeypatch):
    noise = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), SHAPE[0])
    ours = run_jdiff(name, raw, steps, noise, keys, eta=eta)
    assert_same_trajectory(ours, run_diffusers(name, raw, steps, noise, keys, eta=eta, monkeypatch=monkeypatch))


# Every sampler family that can start part way (the UniPC, SDE and singlestep cases came from
# samplers_extra_b_test, which had a copy of this test).
IMG2IMG = [
    ("ddim", SD, 10, 0.55),
    ("euler", SD, 10, 0.55),
    ("dpm++2m", SD, 10, 0.55),
    ("unipc", SD, 10, 0.55),
    ("unipc", {**SD, "solver_order": 3}, 12, 0.6),
    ("dpm++2m_sde", SD, 10, 0.55),
    ("dpm++_single", SD, 10, 0.55),  # starts inside a pair of steps
    ("dpm++_single", {**SD, "solver_order": 3}, 12, 0.6),
    ("dpm++_single", {**SD, "solver_order": 3}, 12, 0.55),
]


@pytest.mark.parametrize("name,raw,steps,strength", IMG2IMG, ids=[f"{c[0]}-{i}" for i, c in enumerate(IMG2IMG)])
def test_image_to_image_starts_part_way_as_diffusers_does(name, raw, steps, strength, monkeypatch):
    noise = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), SHAPE[0])
    ours = run_jdiff(name, raw, steps, noise, keys, strength=strength)
    reference = run_diffusers(name, raw, steps, noise, keys, strength=strength,
                              monkeypatch=monkeypatch if samplers.get(name).stochastic else None)
    assert len(ours[0]) == int(steps * strength)
    assert_same_trajectory(ours, reference)


# One configuration per sampler (a representative of each plan layout and loop length).
COMPILE_ONCE = [(name, SD) for name in samplers.SAMPLERS if name not in ("lcm", "flow_euler", "pndm")] + [
    ("lcm", SD), ("flow_euler", {"shift": 3.0}), ("pndm", {**SD, "skip_prk_steps": True}),
    ("pndm", {**SD, "skip_prk_steps": False}), ("unipc", {**SD, "solver_order": 3}),
    ("dpm++_single", {**SD, "solver_order": 3}), ("heun", {**SD, "use_karras_sigmas": True})]


@pytest.mark.parametrize("name,raw", COMPILE_ONCE, ids=[f"{c[0]}-{i}" for i, c in enumerate(COMPILE_ONCE)])
def test_step_count_and_strength_are_values_not_shapes(name, raw):
    counts = [(5, 1.0), (30, 1.0), (20, 0.3)] if name != "lcm" else [(2, 1.0), (8, 1.0), (6, 0.5)]
    plans = [samplers.make_plan(name, SchedulerConfig.from_dict(raw), n, strength=s, explicit=frozenset(raw))
             for n, s in counts]
    shapes = {(jax.tree.structure(p), tuple(np.shape(a) for a in jax.tree.leaves(p))) for p in plans}
    assert len(shapes) == 1
    traces = []

    @jax.jit
    def run(x, plan, keys):
        traces.append(1)
        return samplers.sample(model_jax, x, plan, keys)

    keys = jax.random.split(jax.random.key(0), SHAPE[0])
    outs = [run(jnp.ones(SHAPE), p, keys) for p in plans]
    assert len(traces) == 1
    assert all(np.isfinite(o).all() for o in outs)
    assert not np.allclose(outs[0], outs[1])


def test_bad_sampler_settings_are_named():
    config = SchedulerConfig.from_dict(SD)
    with pytest.raises(ConfigError, match="valid samplers are: ddim, ddpm, euler"):
        samplers.sampler_config("heun9", config)
    with pytest.raises(ConfigError, match="steps must be an integer"):
        samplers.make_plan("ddim", config, 0)
    with pytest.raises(ConfigError, match="leaves no step"):
        samplers.make_plan("ddim", config, 4, strength=0.1)
    with pytest.raises(ConfigError, match="LCM takes"):
        samplers.make_plan("lcm", config, 80)
    with pytest.raises(ConfigError, match="thresholding"):
        SchedulerConfig.from_dict({**SD, "thresholding": True})
