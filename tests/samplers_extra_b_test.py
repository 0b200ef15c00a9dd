"""UniPC, DPM-Solver++ 2M SDE and DPM-Solver++ singlestep follow diffusers' trajectories (the
harness of samplers_test: every model input and the final latents, float32, atol 1e-5)."""

import diffusers
import jax
import numpy as np
import pytest

from jdiff import samplers
from jdiff.errors import ConfigError
from jdiff.schedules import SchedulerConfig
from samplers_test import SD, SHAPE, assert_same_trajectory, run_diffusers, run_jdiff

V_TRAILING = {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
KARRAS = {**SD, "use_karras_sigmas": True, "timestep_spacing": "linspace"}

DETERMINISTIC = [
    ("unipc", SD, 10),
    ("unipc", SD, 20),
    ("unipc", SD, 1),
    ("unipc", SD, 2),
    ("unipc", V_TRAILING, 8),
    ("unipc", {**V_TRAILING, "rescale_betas_zero_snr": True}, 6),
    ("unipc", KARRAS, 15),
    ("unipc", {**KARRAS, "final_sigmas_type": "sigma_min"}, 7),
    ("unipc", {**SD, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 12),
    ("unipc", {**SD, "solver_order": 3}, 20),
    ("unipc", {**SD, "solver_order": 3}, 3),
    ("unipc", {**V_TRAILING, "solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min",
               "lower_order_final": False}, 9),
    ("unipc", {**SD, "solver_order": 1, "solver_type": "midpoint"}, 5),  # midpoint reads as bh2
    ("dpm++_single", SD, 10),
    ("dpm++_single", SD, 21),
    ("dpm++_single", SD, 1),
    ("dpm++_single", SD, 2),
    ("dpm++_single", {**SD, "solver_type": "heun"}, 7),
    ("dpm++_single", V_TRAILING, 8),  # the class ignores the spacing
    ("dpm++_single", KARRAS, 12),
    ("dpm++_single", {**SD, "final_sigmas_type": "sigma_min"}, 8),
    ("dpm++_single", {**SD, "final_sigmas_type": "sigma_min", "lower_order_final": True}, 8),
    ("dpm++_single", {**SD, "solver_order": 3}, 20),
    ("dpm++_single", {**SD, "solver_order": 3}, 3),
    ("dpm++_single", {**SD, "solver_order": 3, "solver_type": "heun"}, 11),
    ("dpm++_single", {**V_TRAILING, "solver_order": 3, "final_sigmas_type": "sigma_min"}, 9),
    ("dpm++_single", {**KARRAS, "solver_order": 3, "beta_schedule": "squaredcos_cap_v2"}, 10),
]


@pytest.mark.parametrize("name,raw,steps", DETERMINISTIC, ids=[f"{c[0]}-{i}" for i, c in enumerate(DETERMINISTIC)])
def test_deterministic_trajectories_match_diffusers(name, raw, steps):
    noise = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), SHAPE[0])
    assert_same_trajectory(run_jdiff(name, raw, steps, noise, keys), run_diffusers(name, raw, steps, noise, keys))


STOCHASTIC = [
    ("dpm++2m_sde", SD, 10),
    ("dpm++2m_sde", SD, 1),
    ("dpm++2m_sde", {**SD, "solver_type": "heun"}, 20),
    ("dpm++2m_sde", {**V_TRAILING, "rescale_betas_zero_snr": True}, 3),
    ("dpm++2m_sde", {**SD, "final_sigmas_type": "sigma_min", "timestep_spacing": "linspace"}, 16),
    ("dpm++2m_sde_karras", SD, 12),
]


@pytest.mark.parametrize("name,raw,steps", STOCHASTIC, ids=[f"{c[0]}-{i}" for i, c in enumerate(STOCHASTIC)])
def test_sde_trajectories_match_diffusers_given_the_same_noise(name, raw, steps, monkeypatch):
    noise = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), SHAPE[0])
    ours = run_jdiff(name, raw, steps, noise, keys)
    assert_same_trajectory(ours, run_diffusers(name, raw, steps, noise, keys, monkeypatch=monkeypatch))


def _diffusers_config(cls_name, **settings):
    raw = dict(getattr(diffusers, cls_name)(**settings).config)
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def test_checkpoint_schedulers_map_to_these_samplers():
    cases = [("UniPCMultistepScheduler", {}, "unipc"),
             ("DPMSolverSinglestepScheduler", {"solver_order": 3}, "dpm++_single"),
             ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpm++2m_sde"),
             ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
              "dpm++2m_sde_karras"),
             ("DPMSolverMultistepScheduler", {}, "dpm++2m")]
    for cls_name, settings, expected in cases:
        # the files diffusers writes load as they are (nulls, -inf lambda_min_clipped, empty lists)
        config = SchedulerConfig.from_dict(_diffusers_config(cls_name, **settings))
        assert samplers.for_scheduler(cls_name, config) == expected


def test_settings_these_samplers_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match="predict_x0"):
        SchedulerConfig.from_dict({**SD, "predict_x0": False})
    with pytest.raises(ConfigError, match="disable_corrector"):
        SchedulerConfig.from_dict({**SD, "disable_corrector": [0]})
    with pytest.raises(ConfigError, match="algorithm_type"):
        SchedulerConfig.from_dict({**SD, "algorithm_type": "dpmsolver"})
    with pytest.raises(ConfigError, match="solver_order"):
        SchedulerConfig.from_dict({**SD, "solver_order": 4})
    with pytest.raises(ConfigError, match="NaN"):  # diffusers' own result would be NaN
        samplers.make_plan("unipc", SchedulerConfig.from_dict({**SD, "solver_type": "bh1"}), 10,
                           explicit=frozenset(SD) | {"solver_type"})
    sde = SchedulerConfig.from_dict({**SD, "algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(ConfigError, match="dpmsolver\\+\\+ only"):
        samplers.for_scheduler("DPMSolverSinglestepScheduler", sde)
    with pytest.raises(ConfigError, match="order 2 only"):
        samplers.for_scheduler("DPMSolverMultistepScheduler", SchedulerConfig.from_dict({**SD, "solver_order": 3}))
