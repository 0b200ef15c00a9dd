"""Optimise the starting noise of held-out prompts for a differentiable reward, the model fixed
(as DOODL / ReNO do): gradients of the reward of decoded pictures with respect to the noise, through
every sampling step (jdiff.differentiable, rematerialised), then the detector's judgement before and
after.

    python train.py --workdir runs/shapes                      # a trained model first
    python examples/noise_optimisation.py runs/shapes/pipeline --prompts 32 --iterations 20
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import jdiff
from jdiff import differentiable as dg
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


def loss(noise):
    rewards = shapes_reward.reward(pictures(noise), targets)
    # keep the noise a plausible Gaussian draw: its per-image mean square stays near 1
    drift = jnp.mean((jnp.mean(noise ** 2, axis=(1, 2, 3)) - 1.0) ** 2)
    return -jnp.mean(rewards) + drift, rewards


optimiser = optax.adam(args.learning_rate)


@jax.jit
def update(noise, state):
    (value, rewards), grad = jax.value_and_grad(loss, has_aux=True)(noise)
    changes, state = optimiser.update(grad, state, noise)
    return optax.apply_updates(noise, changes), state, jnp.mean(rewards)


noise = jax.random.normal(jax.random.key(args.seed), dg.latent_shape(pipe, len(captions), args.size, args.size))
before = shapes_eval.score_scenes(list(jax.jit(pictures)(noise)), scenes)
state = optimiser.init(noise)
for iteration in range(args.iterations):
    noise, state, reward = update(noise, state)
    print(f"iteration {iteration + 1}/{args.iterations}: mean reward {float(reward):.3f}", flush=True)
after = shapes_eval.score_scenes(list(jax.jit(pictures)(noise)), scenes)
for name in ("whole_scene_accuracy", "count_accuracy", "two_objects_accuracy", "object_colour_accuracy",
             "object_shape_accuracy"):
    print(f"{name}: {before[name]:.3f} -> {after[name]:.3f}")
