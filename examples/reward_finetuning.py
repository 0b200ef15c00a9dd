"""DRaFT-K reward fine-tuning in a few lines of research code: sample from training captions with the
differentiable loop, score the decoded pictures with a reward written in JAX, and backpropagate
through the last K steps into the U-Net. train.py's `reward` stage does the same with checkpoints,
sharding, EMA and resuming (jdiff/app/reward_finetuning.py).

    python train.py --workdir runs/shapes                      # a trained model first
    python examples/reward_finetuning.py runs/shapes/pipeline --iterations 100
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jdiff
from jdiff import differentiable as dg
from jdiff.app import shapes, shapes_eval, shapes_reward

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model", help="a trained pipeline folder (train.py's <workdir>/pipeline)")
parser.add_argument("--iterations", type=int, default=100)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--learning-rate", type=float, default=1e-5)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--grad-steps", type=int, default=1, help="K: backpropagate through the last K steps")
parser.add_argument("--guidance", type=float, default=4.0)
parser.add_argument("--size", type=int, default=32)
parser.add_argument("--data-seed", type=int, default=0, help="the shapes set's seed (train.py's --config.seed)")
parser.add_argument("--held-out", type=int, default=100, help="held-out captions judged before and after")
args = parser.parse_args()

pipe = jdiff.load_pipeline(args.model)
size = dict(height=args.size, width=args.size)
plan = dg.make_plan(pipe, args.steps, sampler="dpm++2m", **size)
empty = dg.prompt_tokens(pipe, [""] * args.batch, negative=True, **size)


def loss(unet, tokens, targets, key):
    params = {**pipe.params, "unet": unet}
    cond, negative = dg.conditioning(pipe, params, tokens), dg.conditioning(pipe, params, empty)
    noise = jax.random.normal(key, dg.latent_shape(pipe, args.batch, args.size, args.size))
    pictures = dg.sample(pipe, params, cond, noise, plan, negative=negative, guidance=args.guidance,
                         max_steps=args.steps, grad_steps=args.grad_steps)
    return -jnp.mean(shapes_reward.reward(pictures, targets))


optimiser = optax.adam(args.learning_rate)


@jax.jit
def update(unet, state, tokens, targets, key):
    value, grad = jax.value_and_grad(loss)(unet, tokens, targets, key)
    changes, state = optimiser.update(grad, state, unet)
    return optax.apply_updates(unet, changes), state, -value


def judge(unet) -> dict:
    scenes = [[p.object for p in shapes.scene(i, "test", args.data_seed)] for i in range(args.held_out)]
    tuned = pipe.replace(params={**pipe.params, "unet": unet})
    pictures = shapes_eval.generate_batched(tuned, [shapes.caption(s) for s in scenes], guidance=args.guidance,
                                            sampler="dpm++2m", steps=25, batch_size=50, seed=100_000)
    return shapes_eval.score_scenes(pictures, scenes)


unet, rng = pipe.params["unet"], np.random.default_rng(0)
state, before = optimiser.init(unet), judge(pipe.params["unet"])
for iteration in range(args.iterations):
    indices = rng.integers(0, 1_000_000, args.batch)  # training scenes, drawn as the shapes set draws them
    scenes = [[p.object for p in shapes.scene(int(i), "train", args.data_seed)] for i in indices]
    tokens = dg.prompt_tokens(pipe, [shapes.caption(s) for s in scenes], **size)
    unet, state, reward = update(unet, state, tokens, shapes_reward.scene_targets(scenes, args.size),
                                 jax.random.key(iteration))
    print(f"iteration {iteration + 1}/{args.iterations}: mean reward {float(reward):.3f}", flush=True)
after = judge(unet)
for name in ("whole_scene_accuracy", "count_accuracy", "two_objects_accuracy", "object_colour_accuracy",
             "object_shape_accuracy"):
    print(f"{name}: {before[name]:.3f} -> {after[name]:.3f}")
