"""Training by flow matching (SD3, Flux): the timestep densities, loss weights and training noise
levels of diffusers' SD3/Flux training scripts; the first step's loss of a fine-tuning stage equals
those scripts' loss computed in PyTorch on the same weights, latents, noise and draws; fine-tuning
an SD3 and a Flux checkpoint with train.py's recipe exports folders that diffusers loads and that
draw what jdiff draws."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

import jdiff
from jdiff.configs import tiny
from jdiff import losses, schedules
from jdiff.app import recipe, stages
from jdiff.errors import ConfigError
from jdiff.models.vae import unscale_latents
from parity import nchw_to_nhwc, nhwc_to_nchw
from pipeline_test import TOL
from sdxl_finetune_test import write_pictures
from tiny_models import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

RESOLUTION = 32  # 4x4 latents through the tiny factor-8 VAEs: 4 image tokens for both families
CAPTIONS = ["a red circle", "circle", "red", "a blue square at the top"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_training")
    make_tiny_sd3_pipeline(root / "sd3")
    make_tiny_flux_pipeline(root / "flux")
    return {"sd3": root / "sd3", "flux": root / "flux", "pictures": write_pictures(root / "pictures")}


def test_timestep_densities_and_weights_equal_diffusers():
    n = 200_000
    torch.manual_seed(0)
    for sampling, kw in (("uniform", {}), ("logit_normal", dict(logit_mean=0.3, logit_std=1.1)),
                         ("mode", dict(mode_scale=1.29)), ("mode", dict(mode_scale=-0.5))):
        ours = np.asarray(losses.sample_unit(jax.random.key(0), n, sampling, **kw))
        theirs = compute_density_for_timestep_sampling(sampling, n, logit_mean=kw.get("logit_mean"),
                                                       logit_std=kw.get("logit_std"),
                                                       mode_scale=kw.get("mode_scale")).numpy()
        quantiles = np.linspace(0.01, 0.99, 25)
        np.testing.assert_allclose(np.quantile(ours, quantiles), np.quantile(theirs, quantiles), atol=0.01,
                                   err_msg=f"{sampling} {kw}")
    sigmas = np.linspace(0.001, 1, 50, dtype=np.float32)
    for weighting in losses.FLOW_WEIGHTINGS:
        np.testing.assert_allclose(np.asarray(losses.flow_loss_weights(weighting, jnp.asarray(sigmas))),
                                   compute_loss_weighting_for_sd3(weighting, torch.from_numpy(sigmas)).numpy(),
                                   rtol=1e-6)
    # the training noise levels: shifted by `shift` (SD3), unshifted where the shift is dynamic (Flux-dev)
    for kw in (dict(shift=3.0), dict(shift=1.0), dict(shift=3.0, use_dynamic_shifting=True)):
        reference = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kw)
        table = losses.flow_training_sigmas(schedules.SchedulerConfig(**kw))
        np.testing.assert_array_equal(table, reference.sigmas.numpy())
        np.testing.assert_array_equal(table * 1000, reference.timesteps.numpy())
    with pytest.raises(ConfigError, match="mode_scale must lie in"):
        losses.sample_unit(jax.random.key(0), 4, "mode", mode_scale=2.0)


def finetune_config(base, pictures, **train):
    config = tiny.get_config()
    config.pretrained = str(base)
    config.stages = "diffusion"
    config.data.update(dataset="folder", folder=str(pictures), resolution=RESOLUTION, caption_dropout=0.0)
    config.diffusion.update(train_text_encoder=False)
    config.diffusion_train.update(steps=2, batch_size=8, learning_rate=0.0, eval_every=100, checkpoint_every=100)
    config.diffusion_train.update(**train)
    config.sample.update(sampler="flow_euler", num_prompts=2, steps=2)
    return config


def first_step(config, latents, key):
    """(loss of the stage's first step, its Objective, its drawn u and noise): the stage's loss on
    clean latents `latents` (NHWC, scaled) for CAPTIONS, with rng `key`."""
    pipe = recipe.diffusion_components(config, None, None, None, None)
    scheduler = schedules.training_scheduler(pipe.scheduler, dict(config.diffusion.schedule))
    objective = stages.make_objective(config, scheduler)
    stage = stages.diffusion_stage(pipe, objective, latent_size=latents.shape[1], caption_dropout=0.0,
                                   train_text_encoder=False, cached_latents=True)
    batch = {"latent_mean": np.asarray(unscale_latents(pipe.vae.config, jnp.asarray(latents))),
             "latent_logvar": np.full_like(latents, -30.0), "caption": np.array(CAPTIONS)}  # x0 = latents
    inputs = jax.tree.map(jnp.asarray, stage.prepare_batch(batch))
    loss = float(jax.jit(stage.loss_fn)(stage.init_params(jax.random.key(0)), stage.frozen, inputs, key)[0])
    _, _, t_key, noise_key = jax.random.split(key, 4)  # the stage's (latent, dropout, timestep, noise) keys
    u = np.asarray(losses.sample_unit(t_key, len(CAPTIONS), objective.timestep_sampling, objective.logit_mean,
                                      objective.logit_std, objective.mode_scale))
    return loss, objective, u, np.asarray(losses.sample_noise(noise_key, latents.shape))


def reference_flow_loss(denoise, scheduler, latents, noise, u, objective):
    """diffusers' train_dreambooth_sd3 / train_dreambooth_flux step: indices = (u T).long(), the
    scheduler's timesteps and sigmas there, noisy = (1 - sigma) x0 + sigma noise, the weighting,
    optional preconditioning; `denoise(noisy, timesteps)` runs the model (NCHW)."""
    x0, eps = torch.from_numpy(nhwc_to_nchw(latents).copy()), torch.from_numpy(nhwc_to_nchw(noise).copy())
    indices = (torch.from_numpy(u.copy()) * scheduler.config.num_train_timesteps).long()
    timesteps, sigmas = scheduler.timesteps[indices], scheduler.sigmas[indices].reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * eps
    with torch.no_grad():
        prediction = denoise(noisy, timesteps)
    target = eps - x0
    if objective.precondition_outputs:
        prediction, target = prediction * (-sigmas) + noisy, x0
    weighting = compute_loss_weighting_for_sd3(objective.flow_weighting, sigmas)
    return torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(len(x0), -1), 1).mean()


OPTIONS = [dict(), dict(timestep_sampling="mode", flow_weighting="cosmap", precondition_outputs=True),
           dict(timestep_sampling="uniform", flow_weighting="sigma_sqrt", logit_mean=0.5)]


def test_first_step_loss_equals_diffusers_sd3_training_script(folders):
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(folders["sd3"])
    with torch.no_grad():
        context, _, pooled, _ = reference.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False)

    def denoise(noisy, timesteps):
        return reference.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=context,
                                     pooled_projections=pooled).sample

    latents = np.random.default_rng(1).standard_normal((4, 4, 4, 16)).astype(np.float32)
    seen = set()
    for options in OPTIONS:
        config = finetune_config(folders["sd3"], folders["pictures"])
        config.diffusion.update(**options)
        loss, objective, u, noise = first_step(config, latents, jax.random.key(3))
        assert objective.flow and objective.timestep_sampling == options.get("timestep_sampling", "logit_normal")
        expected = reference_flow_loss(denoise, reference.scheduler, latents, noise, u, objective).item()
        assert loss == pytest.approx(expected, rel=1e-4), options
        seen.add(round(loss, 6))
    assert len(seen) == len(OPTIONS)  # the options really change the loss


def test_first_step_loss_equals_diffusers_flux_training_script(folders):
    """Flux-dev: packed latents, the guidance embedding at diffusers' --guidance_scale (3.5 unless
    set), timesteps / 1000 into the model, unshifted training levels (dynamic shifting)."""
    reference = diffusers.FluxPipeline.from_pretrained(folders["flux"])
    with torch.no_grad():
        context, pooled, text_ids = reference.encode_prompt(CAPTIONS, None, max_sequence_length=512)
    image_ids = reference._prepare_latent_image_ids(4, 2, 2, "cpu", torch.float32)
    latents = np.random.default_rng(2).standard_normal((4, 4, 4, 4)).astype(np.float32)

    for guidance in (3.5, 5.0):
        def denoise(noisy, timesteps):
            packed = reference._pack_latents(noisy, 4, 4, 4, 4)
            out = reference.transformer(hidden_states=packed, timestep=timesteps / 1000,
                                        guidance=torch.full((4,), guidance), pooled_projections=pooled,
                                        encoder_hidden_states=context, txt_ids=text_ids, img_ids=image_ids,
                                        return_dict=False)[0]
            return reference._unpack_latents(out, RESOLUTION, RESOLUTION, reference.vae_scale_factor)

        config = finetune_config(folders["flux"], folders["pictures"])
        config.diffusion.update(guidance_scale=guidance)
        loss, objective, u, noise = first_step(config, latents, jax.random.key(4))
        expected = reference_flow_loss(denoise, reference.scheduler, latents, noise, u, objective).item()
        assert loss == pytest.approx(expected, rel=1e-4), guidance


def test_flow_objective_options_are_checked(folders):
    config = finetune_config(folders["sd3"], folders["pictures"])
    pipe = recipe.diffusion_components(config, None, None, None, None)
    config.diffusion.min_snr_gamma = 5.0
    with pytest.raises(ConfigError, match="min_snr_gamma.*flow_weighting"):
        stages.make_objective(config, pipe.scheduler)
    config.diffusion.update(min_snr_gamma=0.0, flow_weighting="cosmap")
    # a loss weighting alone draws u uniformly, as diffusers' single --weighting_scheme does
    assert stages.make_objective(config, pipe.scheduler).timestep_sampling == "uniform"
    config.diffusion.timestep_sampling = "mode"
    assert stages.make_objective(config, pipe.scheduler).timestep_sampling == "mode"
    config.diffusion.update(timestep_sampling=None, flow_weighting="snr")
    with pytest.raises(ConfigError, match="unknown diffusion.flow_weighting 'snr'"):
        stages.make_objective(config, pipe.scheduler)
    with pytest.raises(ConfigError, match="shift.*use_dynamic_shifting"):  # Flux-dev shifts by the image size
        schedules.training_scheduler(jdiff.load_pipeline(folders["flux"]).scheduler, {"shift": 2.0})
    tuned = schedules.training_scheduler(pipe.scheduler, {"shift": 2.0})
    assert tuned.config.shift == 2.0 and "shift" in tuned.explicit
    config.diffusion.flow_weighting = "none"
    config.sample.sampler = "dpm++2m"  # refused before any training, not when the samples are drawn
    with pytest.raises(ConfigError, match="sampler 'dpm\\+\\+2m' does not fit.*flow_euler"):
        recipe.run(config, folders["pictures"].parent / "refused")
    assert not (folders["pictures"].parent / "refused" / "diffusion").exists()


def test_fine_tuned_sd3_export_loads_in_diffusers_and_draws_the_same(folders, tmp_path, one_device):
    config = finetune_config(folders["sd3"], folders["pictures"], steps=3, learning_rate=1e-3, warmup_steps=1)
    config.data.update(caption_dropout=0.2)
    config.diffusion_train.mesh.update(data=4, fsdp=2)  # the train state sharded as for the U-Nets
    recipe.run(config, tmp_path / "run")
    tuned, original = jdiff.load_pipeline(tmp_path / "run" / "pipeline"), jdiff.load_pipeline(folders["sd3"])
    assert tuned.family is original.family and tuned.scheduler.config == original.scheduler.config
    changed = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                           tuned.params["transformer"], original.params["transformer"])
    assert max(jax.tree.leaves(changed)) > 1e-4  # the transformer trained
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):  # and nothing else did
        jax.tree.map(np.testing.assert_array_equal, tuned.params[name], original.params[name])

    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "run" / "pipeline")
    prompts = ["a red circle", "circle"]
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = reference(prompts, latents=latents, num_inference_steps=3, guidance_scale=5.0,
                         output_type="np").images
    ours = jdiff.generate(tuned, prompts, steps=3, guidance=5.0, latents=nchw_to_nhwc(latents), mesh=one_device)
    before = jdiff.generate(original, prompts, steps=3, guidance=5.0, latents=nchw_to_nhwc(latents),
                            mesh=one_device)
    assert expected.std() > 0.02
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    assert np.abs(ours - before).max() > 2 * TOL  # and the trained model draws differently


def test_fine_tuned_flux_export_loads_in_diffusers_and_draws_the_same(folders, tmp_path, one_device):
    config = finetune_config(folders["flux"], folders["pictures"], steps=2, learning_rate=1e-3, warmup_steps=1,
                             num_devices=1)
    config.data.cache_text_embeddings = True  # T5's 512 tokens encoded once
    recipe.run(config, tmp_path / "run")
    tuned, original = jdiff.load_pipeline(tmp_path / "run" / "pipeline"), jdiff.load_pipeline(folders["flux"])
    assert tuned.transformer.config.guidance_embeds and tuned.scheduler.config == original.scheduler.config
    reference = diffusers.FluxPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", "circle"]
    expected = reference(prompts, latents=reference._pack_latents(latents, 2, 4, 4, 4), height=RESOLUTION,
                         width=RESOLUTION, num_inference_steps=3, guidance_scale=3.5, output_type="np").images
    ours = jdiff.generate(tuned, prompts, steps=3, guidance=3.5, height=RESOLUTION, width=RESOLUTION,
                          latents=nchw_to_nhwc(latents), mesh=one_device)
    before = jdiff.generate(original, prompts, steps=3, guidance=3.5, height=RESOLUTION, width=RESOLUTION,
                            latents=nchw_to_nhwc(latents), mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
    assert np.abs(ours - before).max() > 2 * TOL
