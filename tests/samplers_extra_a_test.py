"""PNDM, LMS and Heun against diffusers' PNDMScheduler, LMSDiscreteScheduler and
HeunDiscreteScheduler, with the parity harness of samplers_test (every model input and the final
latents, atol 1e-5)."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jdiff import samplers
from jdiff.errors import ConfigError
from jdiff.schedules import SchedulerConfig
from samplers_test import REFERENCE, SD, SHAPE, assert_same_trajectory, run_diffusers, run_jdiff

PLMS = {**SD, "skip_prk_steps": True}  # SD 1.x's scheduler_config.json
V_TRAILING = {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}

CASES = [  # (sampler, config, steps, strength)
    ("pndm", PLMS, 20, 1.0),
    ("pndm", PLMS, 1, 1.0),
    ("pndm", PLMS, 2, 1.0),
    ("pndm", PLMS, 3, 1.0),
    ("pndm", {**PLMS, **V_TRAILING}, 7, 1.0),
    ("pndm", {**PLMS, "timestep_spacing": "linspace", "set_alpha_to_one": True}, 6, 1.0),
    ("pndm", PLMS, 10, 0.55),
    ("pndm", PLMS, 10, 0.85),  # starts at the repeated timestep
    ("pndm", {**SD, "skip_prk_steps": False}, 20, 1.0),  # the Runge-Kutta warm-up
    ("pndm", {**SD, "skip_prk_steps": False, **V_TRAILING}, 4, 1.0),
    ("pndm", {**SD, "skip_prk_steps": False}, 10, 0.55),
    ("pndm", {}, 6, 1.0),  # the class's own defaults: linear betas, PRK, final alpha_bar = alpha_bar[0]
    ("lms", SD, 20, 1.0),
    ("lms", SD, 1, 1.0),
    ("lms", SD, 3, 1.0),
    ("lms", {**SD, **V_TRAILING}, 7, 1.0),
    ("lms", {**SD, "use_karras_sigmas": True, "timestep_spacing": "linspace"}, 12, 1.0),
    ("lms", {**SD, "prediction_type": "sample"}, 5, 1.0),
    ("lms", SD, 10, 0.55),
    ("lms", {}, 6, 1.0),
    ("heun", SD, 20, 1.0),
    ("heun", SD, 1, 1.0),
    ("heun", SD, 2, 1.0),
    ("heun", {**SD, **V_TRAILING}, 7, 1.0),
    ("heun", {**SD, "use_karras_sigmas": True, "timestep_spacing": "linspace"}, 9, 1.0),
    ("heun", {**SD, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.8}, 5, 1.0),
    ("heun", SD, 10, 0.55),
    ("heun", {}, 6, 1.0),
]


@pytest.mark.parametrize("name,raw,steps,strength", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_trajectories_match_diffusers(name, raw, steps, strength):
    noise = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), SHAPE[0])
    ours = run_jdiff(name, raw, steps, noise, keys, strength=strength)
    assert_same_trajectory(ours, run_diffusers(name, raw, steps, noise, keys, strength=strength))


def test_pndm_calls_the_model_at_diffusers_timesteps():
    """PLMS lists the second timestep twice; PRK evaluates each Runge-Kutta step four times."""
    noise = np.zeros(SHAPE, np.float32)
    plms, _ = run_jdiff("pndm", PLMS, 4, noise, None)
    assert [t for _, t in plms] == [751, 501, 501, 251, 1]
    prk, _ = run_jdiff("pndm", {**SD, "skip_prk_steps": False}, 4, noise, None)
    assert [t for _, t in prk] == [751, 626, 626, 501, 501, 376, 376, 251, 251, 126, 126, 1, 1]


@pytest.mark.parametrize("name,raw", [("pndm", PLMS), ("pndm", {**SD, "skip_prk_steps": False}), ("lms", SD),
                                      ("heun", SD)])
def test_add_noise_matches_diffusers_at_the_first_step(name, raw):
    rng = np.random.default_rng(5)
    x0, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    steps, strength = 10, 0.55
    plan = samplers.make_plan(name, SchedulerConfig.from_dict(raw), steps, strength=strength, explicit=frozenset(raw))
    ours = samplers.noised_latents(jnp.asarray(x0), jnp.asarray(noise), plan)

    scheduler = getattr(diffusers, REFERENCE[name]).from_config(raw)
    scheduler.set_timesteps(steps)
    begin = samplers.img2img_start(steps, strength) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    reference = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), scheduler.timesteps[begin:begin + 1])
    np.testing.assert_allclose(np.asarray(ours), reference.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("raw,steps", [(SD, 1), (SD, 7), ({**SD, "use_karras_sigmas": True}, 25)])
def test_lms_coefficients_match_diffusers_quadrature(raw, steps):
    plan = samplers.make_plan("lms", SchedulerConfig.from_dict(raw), steps, explicit=frozenset(raw))
    scheduler = diffusers.LMSDiscreteScheduler.from_config(raw)
    scheduler.set_timesteps(steps)
    for i in range(steps):
        order = min(i + 1, 4)
        reference = [scheduler.get_lms_coefficient(order, i, j) for j in range(order)] + [0.0] * (4 - order)
        # diffusers evaluates the integrand in float32, so its quadrature carries float32 rounding
        np.testing.assert_allclose(plan.lms_coeffs[i], np.float32(reference), rtol=2e-6, atol=1e-7)


def test_checkpoint_scheduler_classes_map_to_these_samplers():
    config = SchedulerConfig.from_dict(PLMS)
    assert samplers.for_scheduler("PNDMScheduler", config) == "pndm"
    assert samplers.for_scheduler("LMSDiscreteScheduler", config) == "lms"
    assert samplers.for_scheduler("HeunDiscreteScheduler", config) == "heun"


@pytest.mark.parametrize("name", ["pndm", "lms", "heun"])
def test_class_defaults_are_those_of_the_diffusers_class(name):
    """An empty scheduler config reads as the diffusers class's constructor defaults."""
    ours = samplers.sampler_config(name, SchedulerConfig(), frozenset()).to_dict()
    theirs = getattr(diffusers, REFERENCE[name])().config
    shared = [k for k in theirs if k in ours and k != "trained_betas"]
    assert len(shared) >= 8
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}


def test_settings_these_classes_lack_are_ignored_as_diffusers_does():
    raw = {**SD, "rescale_betas_zero_snr": True}
    for name in ("pndm", "lms", "heun"):
        assert not samplers.sampler_config(name, SchedulerConfig.from_dict(raw), frozenset(raw)).rescale_betas_zero_snr


def test_refused_pndm_settings_are_named():
    with pytest.raises(ConfigError, match="skip_prk_steps=False.*4\\.\\.992 steps, got 3"):
        samplers.make_plan("pndm", SchedulerConfig.from_dict(SD), 3)
    with pytest.raises(ConfigError, match="PNDM takes prediction_type epsilon or v_prediction"):
        samplers.make_plan("pndm", SchedulerConfig.from_dict({**PLMS, "prediction_type": "sample"}), 5)
    with pytest.raises(ConfigError, match="skip_prk_steps must be true or false"):
        SchedulerConfig.from_dict({**SD, "skip_prk_steps": "yes"})
