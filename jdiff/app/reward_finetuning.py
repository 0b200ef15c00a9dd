"""Reward fine-tuning (DRaFT, Clark et al. 2023) of a trained model on the shapes set: sample from
training captions with the differentiable loop, decode, score with the differentiable shapes reward
(`shapes_reward`, not the judge), and backpropagate through the last K sampling steps into the
U-Net (all of it, or LoRA adapters on its attention).

The `reward` stage of train.py: after 'diffusion' (or alone on <workdir>/pipeline), it trains for
config.reward_train.steps, exports <workdir>/reward/export (a pipeline folder; with LoRA the base
model plus <workdir>/reward/lora), and writes reward_evaluation.json: whole-scene adherence of
held-out captions before and after, judged by the detector.
"""

import json

import jax
import jax.numpy as jnp

from jdiff import differentiable as dg, distributed, sharding, train_lib
from jdiff.app import shapes_eval, shapes_reward, stages
from jdiff.errors import ConfigError
from jdiff.families import Pipeline, save_pipeline
from jdiff.lora import save_lora_weights, training as lora_training
from jdiff.paths import Path
from jdiff.train_lib import Stage


def reward_stage(pipe: Pipeline, reward_fn, *, resolution: int, sampler: str, steps: int, grad_steps: int,
                 guidance: float, lora: lora_training.LoraSpec | None = None, model_meta: dict | None = None,
                 calibration: shapes_reward.Calibration = shapes_reward.REAL_PICTURES) -> Stage:
    """DRaFT-K on `pipe`'s denoiser: batches carry "tokens" and the reward's "targets" (of
    `calibration`); the loss is minus the mean reward of pictures sampled (`steps` of `sampler`,
    classifier-free guidance `guidance`) from fresh noise, differentiated through the last
    `grad_steps` steps. Text encoders and VAE stay frozen; with `lora`, the denoiser too (only its
    adapters train)."""
    family, denoiser = pipe.family, pipe.family.denoiser_name
    plan = dg.make_plan(pipe, steps, height=resolution, width=resolution, sampler=sampler)
    shape = dg.latent_shape(pipe, 1, resolution, resolution)[1:]
    empty = dg.prompt_tokens(pipe, [""], height=resolution, width=resolution, negative=True)
    trained = ("lora",) if lora is not None else (denoiser,)

    def init_params(rng):
        if lora is not None:
            return {"lora": lora_training.init_adapter(pipe.params, lora.targets, lora.rank, rng)}
        return {denoiser: pipe.params[denoiser]}

    def loss_fn(params, frozen, batch, rng):
        weights = {**frozen, **params}
        adapters, scales = {}, None
        if lora is not None:
            adapters = {"lora": lora_training.with_alpha(params["lora"], lora.alpha)}
            scales = jnp.ones((1, 1), jnp.float32)
        size = batch["targets"]["valid"].shape[0]
        cond = dg.conditioning(pipe, weights, batch["tokens"])
        negative = dg.conditioning(pipe, weights, jax.tree.map(lambda a: jnp.broadcast_to(a, (size,) + a.shape[1:]),
                                                                empty))
        noise = jax.random.normal(rng, (size,) + shape, jnp.float32)
        images = dg.sample(pipe, weights, cond, noise, plan, negative=negative, guidance=guidance, adapters=adapters,
                           lora_scales=scales, max_steps=int(plan.num_steps), grad_steps=grad_steps)
        rewards = reward_fn(images, batch["targets"])
        return -jnp.mean(rewards), {"reward": jnp.mean(rewards)}

    def prepare_batch(batch):
        scenes = shapes_eval.scenes_of_batch(batch)
        return {"tokens": family.tokenize(pipe, [str(c) for c in batch["caption"]], warn=False),
                "targets": shapes_reward.scene_targets(scenes, resolution, calibration)}

    frozen = {n: pipe.params[n] for n in pipe.params if n not in trained}
    meta = {n: m.config.to_dict() for n, m in pipe.modules.items()}
    meta.update(trained=list(trained), reward=dict(sampler=sampler, steps=steps, grad_steps=grad_steps,
                                                   guidance=guidance), **(model_meta or {}))
    if lora is not None:
        meta["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "targets": {k: list(v) for k, v in lora.targets.items()}}
    return Stage("reward", init_params, loss_fn, prepare_batch, frozen=frozen, model_meta=meta)


def evaluate(pipe: Pipeline, test_source, *, num_prompts: int, guidance: float, sampler: str, steps: int,
             batch_size: int, seed: int) -> dict:
    """Whole-scene adherence (the detector's judgement) of the first `num_prompts` held-out captions."""
    captions, _ = shapes_eval.first_objects(test_source, num_prompts)
    images = shapes_eval.generate_batched(pipe, captions, guidance=guidance, sampler=sampler, steps=steps,
                                          batch_size=batch_size, seed=seed)
    return shapes_eval.score_scenes(images, shapes_eval.described_scenes(test_source, num_prompts))


def train_reward(config, workdir: Path, train_source, test_source, pipe: Pipeline | None, loader_fn) -> dict | None:
    """The `reward` stage of the recipe (shapes data); None when stopped early (run_steps)."""
    section = config.reward
    if not 1 <= section.grad_steps <= section.steps:
        raise ConfigError(f"reward.grad_steps must be in 1..reward.steps ({section.steps}), got {section.grad_steps}.")
    pipe = stages.trained_pipeline(config, workdir, pipe, "reward", test_source)
    section, resolution = config.reward, config.data.resolution
    lora = None
    if section.lora_rank > 0:
        lora = lora_training.LoraSpec(int(section.lora_rank), float(section.lora_rank),
                                      {pipe.family.denoiser_name: tuple(config.lora.unet_targets)})
    # the reward asks for objects as the model's VAE draws real ones (shapes_reward.Calibration)
    calibration = shapes_reward.calibrate_on_reconstructions(pipe, train_source)
    stage = reward_stage(pipe, shapes_reward.reward, resolution=resolution, sampler=section.sampler,
                         steps=section.steps, grad_steps=section.grad_steps, guidance=section.guidance, lora=lora,
                         calibration=calibration)
    state, _ = train_lib.train(stage, config.reward_train, workdir / "reward", loader_fn(config.reward_train),
                               total_batch=config.reward_train.batch_size)
    if int(state.step) < config.reward_train.steps:
        return None
    trained = sharding.gather(state.ema_params)
    if lora is not None:
        tuned = pipe.replace(adapters={"lora": lora_training.with_alpha(trained["lora"], lora.alpha)})
    else:
        tuned = pipe.replace(params={**pipe.params, **trained})
    if distributed.is_main():
        if lora is not None:
            save_lora_weights(tuned, workdir / "reward" / "lora", adapter_name="lora")
        else:
            save_pipeline(tuned, workdir / "reward" / "export")
    s = config.sample
    kw = dict(num_prompts=section.num_prompts, guidance=section.eval_guidance, sampler=s.sampler, steps=s.steps,
              batch_size=config.evaluate.batch_size, seed=section.eval_seed)
    results = {"before": evaluate(pipe, test_source, **kw), "after": evaluate(tuned, test_source, **kw),
               "judge": "shapes_eval.score_scenes (the detector); trained on shapes_reward.reward",
               "reward_calibration": calibration.to_json(),
               "held_out_captions": section.num_prompts, "guidance": section.eval_guidance,
               "sampler": s.sampler, "steps": s.steps, "seed": section.eval_seed}
    if distributed.is_main():
        (workdir / "reward_evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
