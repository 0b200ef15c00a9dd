"""Noise optimisation (jdiff.noise_optimisation) and train.py's 'noise' stage: the update climbs the
reward and keeps the noise's norm, each prompt's result is independent of its batch, the stage's
pictures start from generate()'s noise, and a killed stage resumes at the first unwritten batch."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import differentiable as dg, noise_optimisation
from jdiff.app import noise_stage, recipe, shapes_eval, shapes_reward
from jdiff.app.shapes_tfds import load_shapes
from jdiff.configs import tiny
from jdiff.image_io import read_png_parameters

SIZE = dict(height=32, width=32)


def brightness(images, targets):
    return jnp.mean(images, axis=(1, 2, 3)) * targets["sign"]


def _inputs(pipe, prompts, steps=2):
    cond = dg.conditioning(pipe, pipe.params, dg.prompt_tokens(pipe, prompts, **SIZE))
    negative = dg.conditioning(pipe, pipe.params, dg.prompt_tokens(pipe, [""] * len(prompts), negative=True, **SIZE))
    return cond, negative, dg.make_plan(pipe, steps, sampler="dpm++2m", **SIZE)


def _first(tree, count):
    return jax.tree.map(lambda a: a[:count], tree)


def _run(update, noise, pipe, cond, negative, targets, iterations):
    state, history = update.init(noise), []
    for _ in range(iterations):
        noise, state, rewards = update(noise, state, pipe.params, cond, negative, targets)
        history.append(np.asarray(rewards))
    return noise, np.stack(history)


def test_the_update_climbs_the_reward_per_picture_and_batches_do_not_interact(tiny_sd_folder):
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    prompts = ["a red circle", "a blue square", "two green triangles"]
    cond, negative, plan = _inputs(pipe, prompts)
    update = noise_optimisation.make_update(pipe, plan, brightness, guidance=3.0, learning_rate=0.05, prior_weight=0)
    noise = dg.noise_from_seeds(pipe, [1, 2, 3], 32, 32)
    sign = jnp.asarray([1.0, -1.0, 1.0])  # the middle picture is asked to get darker
    optimised, history = _run(update, noise, pipe, cond, negative, {"sign": sign}, 6)
    assert (history[-1] > history[0] + 1e-3).all(), history  # every picture's own reward rose
    # picture 0 optimised alone, in a batch of one, reaches the same noise
    alone, _ = _run(update, noise[:1], pipe, _first(cond, 1), _first(negative, 1),
                    {"sign": sign[:1]}, 6)
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(optimised[0]), atol=1e-4)


def test_the_prior_pulls_the_noise_back_to_a_gaussian_norm(tiny_sd_folder):
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    cond, negative, plan = _inputs(pipe, ["a red circle"])
    update = noise_optimisation.make_update(pipe, plan, lambda images, targets: jnp.zeros(images.shape[0]),
                                            guidance=3.0, learning_rate=0.05, prior_weight=1.0)
    noise = 1.6 * dg.noise_from_seeds(pipe, [5], 32, 32)  # mean square ~2.6
    optimised, _ = _run(update, noise, pipe, cond, negative, {}, 10)
    before, after = float(noise_optimisation.norm_prior(noise)[0]), float(noise_optimisation.norm_prior(optimised)[0])
    assert after < 0.2 * before, (before, after)


def test_noise_from_seeds_is_the_noise_generate_draws(tiny_sd_folder):
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    prompts = ["a red circle", "a blue square"]
    cond, negative, plan = _inputs(pipe, prompts, steps=3)
    ours = dg.sample(pipe, pipe.params, cond, dg.noise_from_seeds(pipe, [7, 8], 32, 32), plan, negative=negative,
                     guidance=3.0, max_steps=3)
    theirs = jdiff.generate(pipe, prompts, seed=7, steps=3, sampler="dpm++2m", guidance=3.0, **SIZE)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-4)


def _config(tiny_shapes_dir):
    config = tiny.get_config()
    config.stages = "noise"
    config.data.data_dir = str(tiny_shapes_dir)
    return config


def test_recipe_noise_stage_writes_pictures_and_judgement_and_resumes(tiny_sd_folder, tiny_shapes_dir, tmp_path):
    shutil.copytree(tiny_sd_folder, tmp_path / "pipeline")  # stands for the diffusion stage's export
    config = _config(tiny_shapes_dir)
    results = recipe.run(config, tmp_path)["noise"]
    assert json.loads((tmp_path / "noise_evaluation.json").read_text()) == results
    for case in ("before", "after"):
        assert set(results[case]) >= {"whole_scene_accuracy", "two_objects_accuracy", "count_accuracy"}
    assert results["held_out_captions"] == 10 and results["noise_iterations"] == 2
    assert sorted(p.name for p in (tmp_path / "noise").glob("batch_*.npz")) == ["batch_00000.npz", "batch_00001.npz"]
    for batch in (tmp_path / "noise").glob("batch_*.npz"):
        assert np.isfinite(np.load(batch)["mean_reward_per_iteration"]).all()
    images = sorted((tmp_path / "noise" / "images").glob("*.png"))
    assert len(images) == 10
    captions, _ = shapes_eval.first_objects(load_shapes(tiny_shapes_dir, "test", num_train=64, num_test=16), 10)
    written = read_png_parameters(images[2])
    assert written["prompt"] == captions[2] and written["seed"] == config.noise.seed + 2
    assert (tmp_path / "noise" / "before.png").is_file() and (tmp_path / "noise" / "after.png").is_file()

    # the stage's direct form: the "before" pictures are generate()'s at the same seeds, and a run
    # killed after its first batch optimises only the second
    pipe = jdiff.load_pipeline(tmp_path / "pipeline")
    source = load_shapes(tiny_shapes_dir, "test", num_train=64, num_test=16)
    scenes = shapes_eval.described_scenes(source, 10)
    calibration = shapes_reward.calibrate_on_reconstructions(pipe, load_shapes(tiny_shapes_dir, "train", num_train=64,
                                                                               num_test=16))
    finished = tmp_path / "noise" / "batch_00001.npz"
    kept = np.load(finished)["noise"]
    finished.unlink()
    before, after, histories = noise_stage.optimise(pipe, captions, scenes, config.noise, resolution=32,
                                                    folder=tmp_path / "noise", calibration=calibration)
    assert len(histories) == 1 and len(histories[0]) == 2
    np.testing.assert_allclose(np.load(finished)["noise"], kept, atol=1e-5)
    s = config.noise
    drawn = jdiff.generate(pipe, captions[:8], seed=s.seed, steps=s.steps, sampler=s.sampler, guidance=s.guidance,
                           **SIZE)
    np.testing.assert_allclose(np.stack(before[:8]), np.asarray(drawn), atol=1e-4)
    assert max(float(np.abs(a - b).max()) for a, b in zip(before, after)) > 1e-3  # the optimisation changed them
    assert recipe.run(config, tmp_path)["noise"] == results  # a rerun finds every batch written
    (tmp_path / "noise" / "batch_00000.npz").write_bytes(b"truncated")  # a damaged batch is redone
    _, _, histories = noise_stage.optimise(pipe, captions, scenes, config.noise, resolution=32,
                                           folder=tmp_path / "noise", calibration=calibration)
    assert len(histories) == 1
    config.noise.learning_rate = 0.01  # so is every batch written with other settings
    _, _, histories = noise_stage.optimise(pipe, captions, scenes, config.noise, resolution=32,
                                           folder=tmp_path / "noise", calibration=calibration)
    assert len(histories) == 2


@pytest.mark.parametrize("stage", ["controlnet", "reward", "consistency", "noise"])
def test_stages_after_diffusion_need_a_trained_model(stage, tiny_shapes_dir, tmp_path):
    config = _config(tiny_shapes_dir)
    config.stages = stage
    message = f"the {stage} stage works on a trained model: .*pipeline does not exist"
    with pytest.raises(jdiff.ConfigError, match=message):
        recipe.run(config, tmp_path)


def test_noise_stage_refuses_bad_settings(tiny_sd_folder, tiny_shapes_dir, tmp_path):
    shutil.copytree(tiny_sd_folder, tmp_path / "pipeline")
    config = _config(tiny_shapes_dir)
    config.noise.iterations = 0
    with pytest.raises(jdiff.ConfigError, match="noise.iterations must be at least 1"):
        recipe.run(config, tmp_path)
    config.noise.iterations = 20
    config.data.dataset, config.data.folder = "folder", str(tmp_path)
    with pytest.raises(jdiff.ConfigError, match="noise stage is judged on the shapes set"):
        noise_stage.train_noise(config, tmp_path, None, None, None)
