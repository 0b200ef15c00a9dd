"""Schedules equal diffusers' scheduler tables: betas, alphas_cumprod, timestep spacing, Karras sigmas."""

import numpy as np
import pytest
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from jdiff import schedules
from jdiff.errors import ConfigError


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("beta_schedule", schedules.BETA_SCHEDULES)
def test_tables_match_diffusers(beta_schedule, spacing, zero_snr):
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule, timestep_spacing=spacing,
                        steps_offset=1, rescale_betas_zero_snr=zero_snr)
    ref.set_timesteps(37)
    betas = schedules.betas(beta_schedule)
    if zero_snr:
        betas = schedules.rescale_zero_terminal_snr(betas)
    # torch and numpy float32 linspace differ in the last bits; 2e-6 is far below any sampler's effect.
    np.testing.assert_allclose(schedules.alphas_cumprod(betas), ref.alphas_cumprod.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(schedules.timesteps(37, spacing=spacing, steps_offset=1), ref.timesteps.numpy())


def test_karras_sigmas_and_their_timesteps_match_diffusers():
    ref = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 use_karras_sigmas=True)
    ref.set_timesteps(20)
    train_sigmas = schedules.sigmas_from_alphas_cumprod(schedules.alphas_cumprod(schedules.betas()))
    sigmas = schedules.karras_sigmas(train_sigmas[0], train_sigmas[-1], 20)
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy()[:-1], rtol=1e-5)
    np.testing.assert_allclose(schedules.sigma_to_timestep(sigmas, train_sigmas), ref.timesteps.numpy(),
                               rtol=1e-4, atol=1e-3)


def test_zero_terminal_snr_ends_in_pure_noise():
    alphas_cumprod = schedules.alphas_cumprod(schedules.rescale_zero_terminal_snr(schedules.betas()))
    assert alphas_cumprod[-1] == pytest.approx(0.0, abs=1e-12)
    assert schedules.snr(alphas_cumprod)[0] > schedules.snr(alphas_cumprod)[500] > schedules.snr(alphas_cumprod)[-1]


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="unknown beta schedule 'cosine'"):
        schedules.betas("cosine")
    with pytest.raises(ConfigError, match="unknown timestep spacing"):
        schedules.timesteps(10, spacing="even")
    with pytest.raises(ConfigError, match="num_steps must be in 1..1000"):
        schedules.timesteps(0)
