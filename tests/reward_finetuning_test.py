"""Reward fine-tuning (DRaFT-K, jdiff/app/reward_finetuning.py) and its differentiable shapes reward:
the reward prefers faithful pictures, the stage trains only what it should and resumes exactly, and
the recipe's `reward` stage exports a model diffusers reads and judges it before and after."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import train_lib
from jdiff.app import recipe, shapes, shapes_reward
from jdiff.app.reward_finetuning import reward_stage
from jdiff.app.shapes_tfds import load_shapes
from jdiff.configs import tiny
from jdiff.data import make_loader
from jdiff.lora.training import LoraSpec


def _pictures(scenes, draw=lambda scene: scene):
    return jnp.asarray(np.stack([shapes.render(draw(s), 32, np.random.default_rng(i)) for i, s in enumerate(scenes)])
                       / 255.0, jnp.float32)


def test_the_reward_prefers_faithful_pictures_and_has_gradients():
    scenes = [shapes.scene(i, "test") for i in range(100)]
    targets = shapes_reward.scene_targets([[tuple(p.object) for p in s] for s in scenes], 32)
    real = shapes_reward.reward(_pictures(scenes), targets)
    assert float(real.mean()) > 0.7  # real pictures vary in shade and size within their class
    two = np.array([len(s) == 2 for s in scenes])
    missing = shapes_reward.reward(_pictures(scenes, lambda s: s[:1]), targets)
    assert float(missing[two].mean()) < float(real[two].mean()) - 0.3
    blank = shapes_reward.reward(_pictures(scenes, lambda s: ()), targets)
    assert float(blank.max()) < 0.1
    recoloured = shapes_reward.reward(_pictures(scenes, lambda s: tuple(
        p._replace(rgb=shapes.COLOUR_RGB[shapes.COLOURS[(p.object.colour + 1) % 6]]) for p in s)), targets)
    assert float(recoloured.mean()) < float(real.mean()) - 0.5
    moved = shapes_reward.reward(_pictures(scenes, lambda s: tuple(
        p._replace(x=(p.x + 1 / 3) % 1) for p in s)), targets)  # one cell to the right (wrapping)
    assert float(moved.mean()) < 0
    small = np.array([all(p.object.size == 0 for p in s) for s in scenes])
    enlarged = shapes_reward.reward(_pictures(scenes, lambda s: tuple(p._replace(diameter=p.diameter * 1.35) for p in s)),
                                    targets)  # small objects drawn large
    assert float(enlarged[small].mean()) < float(real[small].mean()) - 0.2
    grad = jax.grad(lambda x: shapes_reward.reward(x, targets).sum())(_pictures(scenes, lambda s: s[:1]))
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0


def test_a_dull_colour_is_no_reason_to_draw_an_object_larger():
    # Generated colours are duller than real ones. A colour term that counts matching pixels grows
    # with the object and paid for enlarging it (0.32 against 0.22 for these pictures): reward
    # fine-tuning then drew small objects large. The purity term does not.
    scenes = [shapes.scene(i, "test") for i in range(200)]
    targets = shapes_reward.scene_targets([[tuple(p.object) for p in s] for s in scenes], 32)

    def dull(pictures):
        return pictures * 0.6 + 0.4 * pictures.mean(axis=-1, keepdims=True)

    normal = shapes_reward.reward(dull(_pictures(scenes)), targets)
    larger = shapes_reward.reward(dull(_pictures(scenes, lambda s: tuple(p._replace(diameter=p.diameter * 1.3)
                                                                           for p in s))), targets)
    assert float(larger.mean()) < float(normal.mean()) - 0.1


def test_the_reward_calibrates_on_the_pictures_a_model_can_draw():
    scenes = [shapes.scene(i, "test") for i in range(200)]
    described = [[tuple(p.object) for p in s] for s in scenes]
    real = np.asarray(_pictures(scenes))
    padded = np.pad(real, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")  # a 3x3 box blur: a soft decoder
    blurred = sum(padded[:, i:i + 32, j:j + 32] for i in range(3) for j in range(3)) / 9
    on_real = shapes_reward.calibrate(real, described, 32)
    np.testing.assert_allclose(on_real.match, shapes_reward.REAL_PICTURES.match, atol=0.15)  # the documented defaults
    np.testing.assert_allclose(on_real.area, shapes_reward.REAL_PICTURES.area, atol=0.25)
    on_blurred = shapes_reward.calibrate(blurred, described, 32)
    assert on_blurred.area.mean() > on_real.area.mean() + 0.05 and on_blurred.match.mean() < on_real.match.mean()
    # blurred pictures lose reward against real pictures' calibration, not against their own
    own = shapes_reward.reward(jnp.asarray(blurred), shapes_reward.scene_targets(described, 32, on_blurred))
    other = shapes_reward.reward(jnp.asarray(blurred), shapes_reward.scene_targets(described, 32))
    assert float(own.mean()) > float(other.mean()) + 0.05, (float(own.mean()), float(other.mean()))


def _train(pipe, workdir, data_dir, lora=None, **section):
    config = tiny.get_config()
    config.reward_train.update(log_every=1, checkpoint_every=2, batch_size=8, **section)
    stage = reward_stage(pipe, shapes_reward.reward, resolution=32, sampler="dpm++2m", steps=3, grad_steps=1,
                         guidance=3.0, lora=lora)
    loader = make_loader(load_shapes(data_dir, "train", num_train=64, num_test=16), batch_size=8, seed=0)
    return train_lib.train(stage, config.reward_train, workdir, loader, total_batch=8)


def test_reward_stage_trains_the_unet_only_and_resumes_exactly(tiny_sd_folder, tiny_shapes_dir, tmp_path):
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    straight = _train(pipe, tmp_path / "straight", tiny_shapes_dir, steps=4, learning_rate=1e-3)
    assert set(straight.state.params) == {"unet"}
    assert all(np.isfinite(h["reward"]) for h in straight.history)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), jax.device_get(straight.state.params["unet"]),
                         pipe.params["unet"])
    assert max(jax.tree.leaves(moved)) > 0
    first = _train(pipe, tmp_path / "resumed", tiny_shapes_dir, steps=4, run_steps=2, learning_rate=1e-3)
    second = _train(pipe, tmp_path / "resumed", tiny_shapes_dir, steps=4, learning_rate=1e-3)
    np.testing.assert_allclose([h["loss"] for h in first.history + second.history],
                               [h["loss"] for h in straight.history], rtol=1e-5)


def test_reward_stage_with_lora_trains_the_adapters_only(tiny_sd_folder, tiny_shapes_dir, tmp_path):
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    result = _train(pipe, tmp_path / "lora", tiny_shapes_dir, lora=LoraSpec(2, 2.0, {"unet": ("to_q", "to_v")}),
                    steps=2, learning_rate=1e-2)
    assert set(result.state.params) == {"lora"}
    ups = [layer["up"] for layer in jax.device_get(result.state.params["lora"]["unet"]).values()]
    assert ups and max(float(np.abs(u).max()) for u in ups) > 0  # the zero-initialised up matrices moved


def test_recipe_reward_stage_exports_and_judges_before_and_after(tiny_sd_folder, tiny_shapes_dir, tmp_path):
    shutil.copytree(tiny_sd_folder, tmp_path / "pipeline")  # stands for the diffusion stage's export
    config = tiny.get_config()
    config.stages = "reward"
    config.data.data_dir = str(tiny_shapes_dir)
    results = recipe.run(config, tmp_path)["reward"]
    for case in ("before", "after"):
        assert set(results[case]) >= {"whole_scene_accuracy", "two_objects_accuracy", "count_accuracy"}
    assert json.loads((tmp_path / "reward_evaluation.json").read_text()) == results
    from diffusers import StableDiffusionPipeline
    StableDiffusionPipeline.from_pretrained(tmp_path / "reward" / "export")  # diffusers reads the export
    assert recipe.run(config, tmp_path)["reward"] == results  # a rerun finds the stage done
    with pytest.raises(jdiff.ConfigError, match="grad_steps"):
        config.reward.grad_steps = 5
        recipe.run(config, tmp_path / "other")
