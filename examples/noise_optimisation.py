"""Optimise the starting noise of held-out prompts for a differentiable reward, the model fixed
(as DOODL / ReNO do): gradients of the reward of decoded pictures with respect to the noise, through
every sampling step (jdiff.differentiable, rematerialised), then the detector's judgement before and
after. The update is `jdiff.noise_optimisation.make_update`; the 'noise' stage of train.py runs the
same on a trained workdir, in resumable batches, and writes noise_evaluation.json.

    python train.py --workdir runs/shapes                      # a trained model first
    python examples/noise_optimisation.py runs/shapes/pipeline --prompts 32 --iterations 20
"""

import argparse

import jax
import jdiff
from jdiff import differentiable as dg, noise_optimisation
from jdiff.app import shapes, shapes_eval, shapes_reward

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model", help="a trained pipeline folder (train.py's <workdir>/pipeline)")
parser.add_argument("--prompts", type=int, default=32, help="held-out scenes of the shapes test split")
parser.add_argument("--data-seed", type=int, default=0, help="the shapes set's seed (train.py's --config.seed)")
parser.add_argument("--iterations", type=int, default=20)
parser.add_argument("--learning-rate", type=float, default=0.05)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--guidance", type=float, default=4.0)
parser.add_argument("--size", type=int, default=32)
parser.add_argument("--seed", type=int, default=100_000)
args = parser.parse_args()

pipe = jdiff.load_pipeline(args.model)
scenes = [[p.object for p in shapes.scene(i, "test", args.data_seed)] for i in range(args.prompts)]
captions = [shapes.caption(scene) for scene in scenes]
targets = shapes_reward.scene_targets(scenes, args.size)
size = dict(height=args.size, width=args.size)
cond = dg.conditioning(pipe, pipe.params, dg.prompt_tokens(pipe, captions, **size))
negative = dg.conditioning(pipe, pipe.params, dg.prompt_tokens(pipe, [""] * len(captions), negative=True, **size))
plan = dg.make_plan(pipe, args.steps, sampler="dpm++2m", **size)


def pictures(noise):
    return dg.sample(pipe, pipe.params, cond, noise, plan, negative=negative, guidance=args.guidance,
                     max_steps=args.steps)


update = noise_optimisation.make_update(pipe, plan, shapes_reward.reward, guidance=args.guidance,
                                        learning_rate=args.learning_rate)

noise = jax.random.normal(jax.random.key(args.seed), dg.latent_shape(pipe, len(captions), args.size, args.size))
before = shapes_eval.score_scenes(list(jax.jit(pictures)(noise)), scenes)
state = update.init(noise)
for iteration in range(args.iterations):
    noise, state, rewards = update(noise, state, pipe.params, cond, negative, targets)
    print(f"iteration {iteration + 1}/{args.iterations}: mean reward {float(rewards.mean()):.3f}", flush=True)
after = shapes_eval.score_scenes(list(jax.jit(pictures)(noise)), scenes)
for name in ("whole_scene_accuracy", "count_accuracy", "two_objects_accuracy", "object_colour_accuracy",
             "object_shape_accuracy"):
    print(f"{name}: {before[name]:.3f} -> {after[name]:.3f}")
