"""Latent consistency distillation (jdiff/app/consistency_distillation.py): the student starts as the
teacher, trains and resumes exactly, and the recipe's `consistency` stage exports an LCM pipeline that
diffusers loads and draws as jdiff does, judged at 1 and 2 steps against the teacher."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jdiff
from jdiff import train_lib
from jdiff.app import recipe, stages
from jdiff.app.consistency_distillation import consistency_stage, student_pipeline
from jdiff.app.shapes_tfds import load_shapes
from jdiff.configs import tiny
from jdiff.data import encode_source, make_loader
from parity import nchw_to_nhwc


@pytest.fixture(scope="module")
def teacher(tiny_sd_folder):
    return jdiff.load_pipeline(tiny_sd_folder)


def test_the_student_starts_as_the_teacher_whatever_the_guidance(teacher):
    student = student_pipeline(teacher, 32)
    assert student.unet.config.time_cond_proj_dim == 32 and student.scheduler.class_name == "LCMScheduler"
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
    t, context = jnp.array([999.0, 300.0]), jax.random.normal(jax.random.key(1), (2, 77, 32))
    expected = teacher.unet.apply({"params": teacher.params["unet"]}, x, t, context)
    for w in (1.0, 7.0):
        w_embedding = jnp.broadcast_to(jdiff.guidance.guidance_scale_embedding(w, 32), (2, 32))
        np.testing.assert_array_equal(student.unet.apply({"params": student.params["unet"]}, x, t, context,
                                                         w_embedding), expected)
    with pytest.raises(jdiff.ConfigError, match="time_cond_proj_dim"):
        student_pipeline(student, 32)  # already guidance-conditioned


def _train(teacher, workdir, data_dir, **section):
    config = tiny.get_config()
    config.consistency_train.update(log_every=1, checkpoint_every=2, **section)
    student = student_pipeline(teacher, 32)
    source = encode_source(stages.latent_encoder(teacher.vae, teacher.params["vae"]),
                           load_shapes(data_dir, "train", num_train=64, num_test=16))
    stage = consistency_stage(teacher, student, latent_size=4)
    return train_lib.train(stage, config.consistency_train, workdir, make_loader(source, batch_size=8, seed=0),
                           total_batch=8)


def test_trains_the_student_only_and_resumes_exactly(teacher, tiny_shapes_dir, tmp_path):
    straight = _train(teacher, tmp_path / "straight", tiny_shapes_dir, steps=4, learning_rate=1e-3)
    assert set(straight.state.params) == {"unet"}
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in straight.history)
    cond_proj = jax.device_get(straight.state.params["unet"]["time_embedding"]["cond_proj"]["kernel"])
    assert np.abs(cond_proj).max() > 0  # the guidance embedding learns
    first = _train(teacher, tmp_path / "resumed", tiny_shapes_dir, steps=4, run_steps=2, learning_rate=1e-3)
    second = _train(teacher, tmp_path / "resumed", tiny_shapes_dir, steps=4, learning_rate=1e-3)
    np.testing.assert_allclose([h["loss"] for h in first.history + second.history],
                               [h["loss"] for h in straight.history], rtol=1e-5)


def test_recipe_consistency_stage_exports_an_lcm_pipeline_diffusers_draws_alike(tiny_sd_folder, tiny_shapes_dir,
                                                                                 tmp_path, one_device):
    shutil.copytree(tiny_sd_folder, tmp_path / "pipeline")  # stands for the diffusion stage's export
    config = tiny.get_config()
    config.stages = "consistency"
    config.data.data_dir = str(tiny_shapes_dir)
    results = recipe.run(config, tmp_path)["consistency"]
    assert set(results) >= {"student_1_steps", "student_2_steps", "teacher_2_steps"}
    assert "whole_scene_accuracy" in results["student_1_steps"]
    assert json.loads((tmp_path / "consistency_evaluation.json").read_text()) == results

    from diffusers import LCMScheduler, StableDiffusionPipeline

    export = tmp_path / "consistency" / "export"
    reference = StableDiffusionPipeline.from_pretrained(export, safety_checker=None, requires_safety_checker=False)
    assert isinstance(reference.scheduler, LCMScheduler)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    prompts = ["a small red circle at the top left", "a large blue square at the bottom"]
    # one LCM step ends on the clean sample: no per-step noise to share between the two libraries
    expected = reference(prompts, latents=latents, num_inference_steps=1, guidance_scale=4.0, output_type="np").images
    ours = jdiff.generate(jdiff.load_pipeline(export), prompts, steps=1, guidance=4.0, latents=nchw_to_nhwc(latents),
                          mesh=one_device)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2 / 255)
