"""Fine-tuning trains the checkpoint's own objective: its schedule and prediction type, not the run
config's defaults for a model built from scratch (which are v-prediction)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jdiff
from jdiff.configs import tiny
from jdiff import losses, schedules
from jdiff.app import recipe, stages
from jdiff.errors import ConfigError
from parity import nhwc_to_nchw
from tiny_models import write_captioned_pictures

PREDICTION_TYPES = ("epsilon", "v_prediction")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_sd_folder):
    """A tiny SD checkpoint per prediction type (same weights) and a folder of captioned pictures."""
    root = tmp_path_factory.mktemp("finetune")
    folders = {}
    for prediction_type in PREDICTION_TYPES:
        folder = root / prediction_type
        shutil.copytree(tiny_sd_folder, folder)  # make_tiny_sd_pipeline's checkpoint, written once per session
        config_file = folder / "scheduler" / "scheduler_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": prediction_type}))
        folders[prediction_type] = folder
    return folders, write_captioned_pictures(root / "pictures", 32, 32)


def finetune_config(base, images, **diffusion):
    config = tiny.get_config()
    config.pretrained = str(base)
    config.stages = "diffusion"
    config.data.update(dataset="folder", folder=str(images), caption_dropout=0.0)
    config.diffusion.update(train_text_encoder=False, **diffusion)
    config.diffusion_train.update(steps=2, learning_rate=0.0, eval_every=100, checkpoint_every=100)
    # The sampler the tests below compare exports with, so that the recipe's end-of-training samples
    # and the tests' generate() calls share one compiled program.
    config.sample.update(num_prompts=2, steps=2, sampler="ddim")
    return config


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_fine_tuning_with_learning_rate_zero_exports_the_same_model(checkpoints, prediction_type, tmp_path):
    folders, images = checkpoints
    recipe.run(finetune_config(folders[prediction_type], images), tmp_path / "run")
    tuned = jdiff.load_pipeline(tmp_path / "run")
    original = jdiff.load_pipeline(folders[prediction_type])
    assert tuned.scheduler.config == original.scheduler.config
    assert tuned.scheduler.config.prediction_type == prediction_type
    # On every device, as the recipe samples (the same program: only traced settings differ).
    kw = dict(sampler="ddim", steps=4, guidance=5.0, seed=3)
    prompts = ["a red circle", "circle"]
    np.testing.assert_allclose(jdiff.generate(tuned, prompts, **kw), jdiff.generate(original, prompts, **kw),
                               rtol=0, atol=2 / 255)


def test_a_prediction_type_change_must_be_asked_for(checkpoints, tmp_path):
    folders, images = checkpoints
    config = finetune_config(folders["epsilon"], images)
    config.diffusion.schedule.prediction_type = "v_prediction"
    with pytest.raises(ConfigError, match="model predicts 'epsilon'.*change_prediction_type=True"):
        recipe.run(config, tmp_path / "refused")
    base = jdiff.load_pipeline(folders["epsilon"]).scheduler
    changed = schedules.training_scheduler(base, {"prediction_type": "v_prediction", "beta_end": None},
                                           change_prediction_type=True)
    assert changed.config.prediction_type == "v_prediction" and "prediction_type" in changed.explicit
    assert changed.config.beta_end == base.config.beta_end  # unset fields stay the checkpoint's


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_first_step_loss_equals_diffusers_training_recipe(checkpoints, prediction_type, tmp_path):
    """The diffusion stage's loss on a fixed batch, against diffusers' train_text_to_image recipe
    (`noise_scheduler.add_noise`, `get_velocity`, MSE) with the same weights, noise and timesteps."""
    import diffusers
    import transformers

    folders, images = checkpoints
    config = finetune_config(folders[prediction_type], images)
    pipe = recipe.diffusion_components(config, tmp_path, None, None, None)
    scheduler = schedules.training_scheduler(pipe.scheduler, dict(config.diffusion.schedule))
    objective = stages.make_objective(config, scheduler)
    stage = stages.diffusion_stage(pipe, objective, latent_size=4, caption_dropout=0.0, train_text_encoder=False,
                                   cached_latents=True)

    rng = np.random.default_rng(1)
    captions = ["a red circle", "circle", "red", "a circle"]
    latents = rng.standard_normal((4, 4, 4, 4)).astype(np.float32)  # clean scaled latents, NHWC
    scaling = pipe.vae.config.scaling_factor
    # Posterior with (nearly) zero variance: the stage's x0 is these latents (std exp(-15) ~ 3e-7).
    batch = stage.prepare_batch({"latent_mean": latents / scaling, "latent_logvar": np.full_like(latents, -30.0),
                                 "caption": np.array(captions)})
    params = stage.init_params(jax.random.key(0))
    key = jax.random.key(7)
    loss, _ = jax.jit(stage.loss_fn)(params, stage.frozen, jax.tree.map(jnp.asarray, batch), key)

    # The stage splits its step key into (latent, caption dropout, timestep, noise) keys.
    _, _, t_key, noise_key = jax.random.split(key, 4)
    timesteps = np.asarray(losses.sample_timesteps(t_key, 4, scheduler.config.num_train_timesteps))
    noise = np.asarray(losses.sample_noise(noise_key, latents.shape))

    ref = folders[prediction_type]
    noise_scheduler = diffusers.DDPMScheduler.from_pretrained(ref, subfolder="scheduler")
    unet = diffusers.UNet2DConditionModel.from_pretrained(ref, subfolder="unet").eval()
    text = transformers.CLIPTextModel.from_pretrained(ref, subfolder="text_encoder").eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer")
    with torch.no_grad():
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        x0, eps = torch.from_numpy(nhwc_to_nchw(latents).copy()), torch.from_numpy(nhwc_to_nchw(noise).copy())
        t = torch.from_numpy(timesteps.copy()).long()
        noisy = noise_scheduler.add_noise(x0, eps, t)
        if noise_scheduler.config.prediction_type == "epsilon":
            target = eps
        else:
            target = noise_scheduler.get_velocity(x0, eps, t)
        prediction = unet(noisy, t, text(ids)[0]).sample
        reference = F.mse_loss(prediction.float(), target.float(), reduction="mean").item()
    assert noise_scheduler.config.prediction_type == prediction_type
    assert float(loss) == pytest.approx(reference, rel=1e-4)
    # and the other target gives a clearly different loss, so the check can tell them apart
    other = eps if prediction_type == "v_prediction" else noise_scheduler.get_velocity(x0, eps, t)
    assert abs(F.mse_loss(prediction, other).item() - reference) > 0.05 * reference
