"""Latent consistency distillation (LCM, Luo et al. 2023) of a trained U-Net model: a student that
draws in 1-4 steps what the teacher draws in 25, conditioned on the guidance scale through the
U-Net's `time_cond_proj_dim` embedding as LCM checkpoints are (so the export is an ordinary
diffusers folder with an LCMScheduler, and `generate(..., sampler="lcm")` or diffusers' pipeline
runs it).

One training step, on the teacher's own training latents and captions:
- a timestep t_n of the teacher's 50-step DDIM grid (k = 1000 / 50 apart) and its neighbour
  t_{n-k}; a guidance scale g drawn from `guidance_range` per example;
- the teacher, with classifier-free guidance at g, takes one DDIM step from x_{t_n} to x_{t_{n-k}};
- the student's consistency function f(x, t, g) = c_skip(t) x + c_out(t) x0_student(x, t, g), with
  LCMScheduler's boundary scalings (sigma_data 0.5, timestep scaling 10), at (x_{t_n}, t_n) is pulled
  towards the target network's value at (x_{t_{n-k}}, t_{n-k}), with the pseudo-Huber loss. The
  target network is the EMA of the student (train_lib's, at consistency_train.ema_decay: LCM's 0.95);
  the student itself is what is exported. With the student as its own target (no EMA), a pilot's
  1-step pictures fell to whole-scene 0.0 in 300 steps, from 0.63 before training.

The `consistency` stage of train.py (after 'diffusion', or alone on <workdir>/pipeline) exports
<workdir>/consistency/export and writes consistency_evaluation.json: whole-scene adherence of
held-out captions at 1, 2 and 4 student steps against the teacher's 25.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp

from jdiff import distributed, guidance as guidance_lib, schedules, sharding, train_lib
from jdiff.app import shapes_eval, stages
from jdiff.data import encode_source
from jdiff.errors import ConfigError
from jdiff.families import Pipeline, save_pipeline
from jdiff.models.unet import UNet2DConditionModel
from jdiff.models.vae import DiagonalGaussian, scale_latents
from jdiff.paths import Path
from jdiff.train_lib import Stage

SIGMA_DATA = 0.5


def boundary_scalings(t, timestep_scaling: float):
    """LCMScheduler's c_skip, c_out at timestep t: f(x, t) = c_skip x + c_out x0 is x itself at t = 0."""
    scaled = t * timestep_scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


def student_pipeline(teacher: Pipeline, time_cond_proj_dim: int, original_inference_steps: int = 50,
                     timestep_scaling: float = 10.0) -> Pipeline:
    """The teacher with a guidance-conditioned U-Net (its weights, plus a zero `cond_proj`, so the
    student starts as the teacher) and an LCMScheduler of the teacher's noise schedule."""
    unet = teacher.unet
    if teacher.family.denoiser_name != "unet" or unet.config.time_cond_proj_dim:
        raise ConfigError("consistency distillation starts from a U-Net model without a guidance embedding "
                          "(time_cond_proj_dim unset).")
    config = dataclasses.replace(unet.config, time_cond_proj_dim=int(time_cond_proj_dim))
    student = UNet2DConditionModel(config, dtype=unet.dtype, param_dtype=unet.param_dtype,
                                   gradient_checkpointing=unet.gradient_checkpointing)
    params = jax.tree.map(lambda a: a, teacher.params["unet"])
    width = int(config.block_out_channels[0])  # the sinusoidal embedding cond_proj adds to
    params["time_embedding"] = {**params["time_embedding"],
                                "cond_proj": {"kernel": jnp.zeros((time_cond_proj_dim, width), jnp.float32)}}
    fields = dict(original_inference_steps=int(original_inference_steps), timestep_scaling=float(timestep_scaling))
    scheduler = schedules.Scheduler(dataclasses.replace(teacher.scheduler.config, **fields), "LCMScheduler",
                                    teacher.scheduler.explicit | frozenset(fields) | {"prediction_type"})
    return teacher.replace(modules={**teacher.modules, "unet": student}, params={**teacher.params, "unet": params},
                           scheduler=scheduler)


def consistency_stage(teacher: Pipeline, student: Pipeline, *, latent_size: int, guidance_range=(2.0, 6.0),
                      huber_c: float = 0.001) -> Stage:
    """The student's U-Net learns the teacher's guided DDIM trajectories; batches carry the frozen
    VAE's posteriors ("latent_mean", "latent_logvar") and "tokens"."""
    family, vae = teacher.family, teacher.vae
    config = teacher.scheduler.config
    if schedules.is_flow(teacher.scheduler.class_name):
        raise ConfigError("consistency distillation here distils noise-schedule (DDPM-family) models, not flows.")
    alpha_bar = jnp.asarray(schedules.train_alphas_cumprod(config), jnp.float32)
    t_count = config.num_train_timesteps
    skip = t_count // student.scheduler.config.original_inference_steps
    grid = jnp.arange(1, student.scheduler.config.original_inference_steps + 1) * skip - 1  # LCM's DDIM grid
    scaling = student.scheduler.config.timestep_scaling
    prediction = config.prediction_type
    teacher_unet, student_unet = teacher.unet, student.unet
    dim = student_unet.config.time_cond_proj_dim
    empty_tokens = family.tokenize(teacher, [""], warn=False)
    low, high = guidance_range

    def x0_and_eps(out, x, t):
        a = alpha_bar[t][:, None, None, None]
        alpha, sigma = jnp.sqrt(a), jnp.sqrt(1 - a)
        return (schedules.predicted_x0(out, x, alpha, sigma, prediction),
                schedules.predicted_eps(out, x, alpha, sigma, prediction))

    def consistency(unet_params, x, t, context, w_embedding):
        out = student_unet.apply({"params": unet_params}, x, t, context, w_embedding).astype(jnp.float32)
        c_skip, c_out = boundary_scalings(t.astype(jnp.float32), scaling)
        x0, _ = x0_and_eps(out, x, t)
        return c_skip[:, None, None, None] * x + c_out[:, None, None, None] * x0

    def init_params(rng):
        return {"unet": student.params["unet"]}

    def loss_fn(params, frozen, batch, rng):
        latent_rng, t_rng, noise_rng, w_rng = jax.random.split(rng, 4)
        posterior = DiagonalGaussian(batch["latent_mean"], batch["latent_logvar"])
        x0 = scale_latents(vae.config, posterior.sample(latent_rng))
        size = x0.shape[0]
        t = grid[jax.random.randint(t_rng, (size,), 0, len(grid))]
        t_prev = jnp.maximum(t - skip, 0)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        a = alpha_bar[t][:, None, None, None]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
        scale = jax.random.uniform(w_rng, (size,), minval=low, maxval=high)
        w_embedding = guidance_lib.guidance_scale_embedding(scale - 1, dim)  # as LCM pipelines embed it
        context = family.encode_prompts(teacher.modules, frozen, batch["tokens"])["context"]
        empty = family.encode_prompts(teacher.modules, frozen, jax.tree.map(
            lambda v: jnp.broadcast_to(v, (size,) + v.shape[1:]), empty_tokens))["context"]
        # the teacher's guided DDIM step x_{t_n} -> x_{t_{n-k}}
        both = teacher_unet.apply({"params": frozen["teacher_unet"]}, jnp.concatenate([x_t, x_t]),
                                  jnp.concatenate([t, t]), jnp.concatenate([empty, context])).astype(jnp.float32)
        (x0_u, x0_c), (eps_u, eps_c) = [jnp.split(v, 2) for v in x0_and_eps(both, jnp.concatenate([x_t, x_t]),
                                                                             jnp.concatenate([t, t]))]
        w = (scale - 1)[:, None, None, None]
        guided_x0, guided_eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
        a_prev = alpha_bar[t_prev][:, None, None, None]
        x_prev = jax.lax.stop_gradient(jnp.sqrt(a_prev) * guided_x0 + jnp.sqrt(1 - a_prev) * guided_eps)
        prediction_now = consistency(params["unet"], x_t, t, context, w_embedding)
        target = jax.lax.stop_gradient(consistency(frozen["ema"]["unet"], x_prev, t_prev, context, w_embedding))
        loss = jnp.mean(jnp.sqrt((prediction_now - target) ** 2 + huber_c**2) - huber_c)
        return loss, {}

    def prepare_batch(batch):
        return {"latent_mean": batch["latent_mean"], "latent_logvar": batch["latent_logvar"],
                "tokens": family.tokenize(teacher, [str(c) for c in batch["caption"]], warn=False)}

    frozen = {n: teacher.params[n] for n in family.text_encoder_names if n in teacher.params}
    frozen["teacher_unet"] = teacher.params["unet"]
    meta = {"student_unet": student_unet.config.to_dict(), "teacher_unet": teacher_unet.config.to_dict(),
            "guidance_range": [low, high], "huber_c": huber_c, "grid_skip": int(skip)}
    del latent_size  # the latents come from the batches; kept for symmetry with diffusion_stage
    return Stage("consistency", init_params, loss_fn, prepare_batch, frozen=frozen, model_meta=meta, reads_ema=True)


def evaluate(teacher: Pipeline, student: Pipeline, test_source, *, num_prompts: int, guidance: float,
             student_steps, teacher_sampler: str, teacher_steps: int, batch_size: int, seed: int) -> dict:
    """Whole-scene adherence of held-out captions: the student at each of `student_steps` (LCM
    sampler, the guidance scale embedded), the teacher at `teacher_steps` with classifier-free guidance."""
    captions, _ = shapes_eval.first_objects(test_source, num_prompts)
    scenes = shapes_eval.described_scenes(test_source, num_prompts)
    run = lambda pipe, sampler, steps: shapes_eval.score_scenes(shapes_eval.generate_batched(  # noqa: E731
        pipe, captions, guidance=guidance, sampler=sampler, steps=steps, batch_size=batch_size, seed=seed), scenes)
    results = {f"student_{n}_steps": run(student, "lcm", n) for n in student_steps}
    results[f"teacher_{teacher_steps}_steps"] = run(teacher, teacher_sampler, teacher_steps)
    return results


def train_consistency(config, workdir: Path, train_source, test_source, pipe: Pipeline | None,
                      loader_fn) -> dict | None:
    """The `consistency` stage of the recipe (shapes data); None when stopped early (run_steps)."""
    pipe = stages.trained_pipeline(config, workdir, pipe, "consistency", test_source)
    section = config.consistency
    student = student_pipeline(pipe, section.time_cond_proj_dim)
    source = encode_source(stages.latent_encoder(pipe.vae, pipe.params["vae"]), train_source,
                           show_progress=distributed.is_main())
    stage = consistency_stage(pipe, student, latent_size=config.data.resolution // pipe.vae_scale_factor,
                              guidance_range=tuple(section.guidance_range), huber_c=section.huber_c)
    state, _ = train_lib.train(stage, config.consistency_train, workdir / "consistency",
                               loader_fn(source, config.consistency_train), total_batch=config.consistency_train.batch_size)
    if int(state.step) < config.consistency_train.steps:
        return None
    # the online student: its EMA was the target network
    distilled = student.replace(params={**student.params, **sharding.gather(state.params)},
                                source=str(workdir / "consistency" / "export"))
    if distributed.is_main():
        save_pipeline(distilled, workdir / "consistency" / "export")
    s = config.sample
    results = evaluate(pipe, distilled, test_source, num_prompts=section.num_prompts, guidance=section.eval_guidance,
                       student_steps=tuple(section.eval_steps), teacher_sampler=s.sampler, teacher_steps=s.steps,
                       batch_size=config.evaluate.batch_size, seed=section.eval_seed)
    results.update(held_out_captions=section.num_prompts, guidance=section.eval_guidance, seed=section.eval_seed)
    if distributed.is_main():
        (workdir / "consistency_evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
