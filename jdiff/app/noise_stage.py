"""The 'noise' stage of train.py: optimise the starting noise of held-out prompts for the shapes
reward (`jdiff.noise_optimisation`, the model fixed), then judge the pictures before and after with
the detector.

After 'diffusion' (or alone on <workdir>/pipeline). Prompts go in batches of noise.batch_size, each
optimised for noise.iterations Adam steps through every one of noise.steps sampling steps; every
finished batch is written to <workdir>/noise/batch_NNNNN.npz at once, so a killed run resumes at the
first batch not written. Prompt i starts from the noise `generate(seed=noise.seed + i)` draws, and
its result does not depend on the batch it is in. Writes <workdir>/noise/images/NNNNN.png (the
optimised pictures, with their generation parameters), noise/before.png and noise/after.png (grids
of the first 16), and noise_evaluation.json: whole-scene adherence before and after, the same
sampler and steps for both.
"""

import json

import jax
import numpy as np
from tqdm import tqdm

from jdiff import differentiable as dg, distributed, image_io, noise_optimisation, paths, sharding
from jdiff.app import shapes_eval, shapes_reward, stages
from jdiff.batching import padded_batches
from jdiff.errors import ConfigError
from jdiff.families import Pipeline
from jdiff.paths import Path

_GRID = 16  # pictures in the before/after grids


def check_section(section) -> None:
    for name in ("num_prompts", "batch_size", "iterations", "steps"):
        if int(section[name]) < 1:
            raise ConfigError(f"noise.{name} must be at least 1, got {section[name]}.")
    if section.learning_rate <= 0 or section.prior_weight < 0:
        raise ConfigError(f"noise.learning_rate must be positive and noise.prior_weight not negative, got "
                          f"{section.learning_rate} and {section.prior_weight}.")


def _read_batch(file: Path, seeds: np.ndarray, shape: tuple, settings_key: str) -> np.ndarray | None:
    """A finished batch's optimised noise, or None when the file is missing, unreadable or from other
    prompts or settings."""
    if not file.is_file():
        return None
    try:
        with file.open("rb") as f:
            saved = np.load(f)
            noise, saved_seeds, saved_key = saved["noise"], saved["seeds"], str(saved["settings"])
    except (OSError, ValueError, KeyError):
        return None
    if noise.shape != shape or not np.array_equal(saved_seeds, seeds) or saved_key != settings_key:
        return None
    return noise


def _write_batch(file: Path, seeds: np.ndarray, noise: np.ndarray, history: np.ndarray, settings_key: str) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, seeds=seeds, noise=noise, mean_reward_per_iteration=history, settings=np.asarray(settings_key))

    paths.write_file(file, write)


def _put(tree, target):
    return sharding.put(tree, jax.tree.map(lambda _: target, tree))


def optimise(pipe: Pipeline, captions: list[str], scenes: list, section, *, resolution: int, folder: Path,
             calibration: shapes_reward.Calibration = shapes_reward.REAL_PICTURES, mesh=None) -> tuple:
    """(pictures from the seeds' noise, pictures from the optimised noise, mean reward per iteration
    of each batch that ran now) for every caption; finished batches in `folder` are reused."""
    mesh = mesh or sharding.make_mesh({"data": -1}, num_devices=int(section.num_devices))
    batch_size = int(section.batch_size)
    sharding.batch_size_per_process(mesh, batch_size)  # refuses a batch that does not split
    plan = dg.make_plan(pipe, int(section.steps), height=resolution, width=resolution, sampler=section.sampler)
    update = noise_optimisation.make_update(pipe, plan, shapes_reward.reward, guidance=float(section.guidance),
                                            learning_rate=float(section.learning_rate),
                                            prior_weight=float(section.prior_weight))
    on_batch = sharding.batch_sharding(mesh)
    # what a finished batch was optimised with: a batch written with other settings is redone
    settings = {k: section[k] for k in ("iterations", "learning_rate", "prior_weight", "sampler", "steps", "guidance")}
    settings_key = json.dumps(settings | {"calibration": np.asarray(calibration).tolist()}, sort_keys=True)
    params = sharding.put(pipe.params, sharding.tree_shardings(pipe.params, mesh))
    encode = jax.jit(lambda params, tokens: dg.conditioning(pipe, params, tokens))
    pictures = jax.jit(lambda params, cond, negative, noise: dg.sample(
        pipe, params, cond, noise, plan, negative=negative, guidance=float(section.guidance),
        max_steps=int(section.steps)))
    size = dict(height=resolution, width=resolution)
    empty = _put(dg.prompt_tokens(pipe, [""] * batch_size, negative=True, **size), on_batch)
    negative = encode(params, empty)
    before, after, histories = [], [], []
    batches = list(padded_batches(len(captions), batch_size))
    bar = tqdm(total=len(batches) * int(section.iterations), desc="noise", unit="step",
               disable=not distributed.is_main())
    for number, (indices, real) in enumerate(batches):
        seeds = np.asarray([int(section.seed) + i for i in indices], np.int64)
        tokens = _put(dg.prompt_tokens(pipe, [captions[i] for i in indices], **size), on_batch)
        cond = encode(params, tokens)
        start = _put(np.asarray(dg.noise_from_seeds(pipe, seeds, resolution, resolution)), on_batch)
        file = folder / f"batch_{number:05d}.npz"
        noise = _read_batch(file, seeds, tuple(start.shape), settings_key)
        if noise is None:
            targets = _put(shapes_reward.scene_targets([scenes[i] for i in indices], resolution, calibration), on_batch)
            noise, state, history = start, update.init(start), []
            for _ in range(int(section.iterations)):
                noise, state, rewards = update(noise, state, params, cond, negative, targets)
                history.append(float(np.mean(sharding.gather(rewards)[:real])))
                bar.update(1)
                bar.set_postfix(reward=f"{history[-1]:.3f}")
            noise = sharding.gather(noise)
            if distributed.is_main():
                _write_batch(file, seeds, noise, np.asarray(history, np.float32), settings_key)
                bar.write(f"[noise] batch {number + 1}/{len(batches)}: mean reward {history[0]:.3f} -> "
                          f"{history[-1]:.3f} (before the last update)")
            histories.append(history)
        else:
            bar.update(int(section.iterations))
        noise = _put(noise, on_batch)
        before.extend(sharding.gather(pictures(params, cond, negative, start))[:real])
        after.extend(sharding.gather(pictures(params, cond, negative, noise))[:real])
    bar.close()
    return before, after, histories


def train_noise(config, workdir: Path, train_source, test_source, pipe: Pipeline | None) -> dict:
    """The `noise` stage of the recipe (shapes data): optimised pictures and noise_evaluation.json."""
    section, resolution = config.noise, config.data.resolution
    check_section(section)
    pipe = stages.trained_pipeline(config, workdir, pipe, "noise", test_source)
    captions, _ = shapes_eval.first_objects(test_source, int(section.num_prompts))
    scenes = shapes_eval.described_scenes(test_source, int(section.num_prompts))
    folder = workdir / "noise"
    folder.mkdir(parents=True, exist_ok=True)
    # the reward asks for objects as the model's VAE draws real ones (shapes_reward.Calibration)
    calibration = shapes_reward.calibrate_on_reconstructions(pipe, train_source)
    before, after, _ = optimise(pipe, captions, scenes, section, resolution=resolution, folder=folder,
                                calibration=calibration)
    settings = {"sampler": section.sampler, "steps": int(section.steps), "guidance": float(section.guidance),
                "noise_iterations": int(section.iterations), "noise_learning_rate": float(section.learning_rate),
                "noise_prior_weight": float(section.prior_weight), "reward": "jdiff.app.shapes_reward.reward"}
    results = {"before": shapes_eval.score_scenes(before, scenes), "after": shapes_eval.score_scenes(after, scenes),
               "judge": "shapes_eval.score_scenes (the detector); optimised for shapes_reward.reward",
               "held_out_captions": len(captions), "seed": int(section.seed), **settings,
               "reward_calibration": calibration.to_json()}
    if distributed.is_main():
        (folder / "images").mkdir(exist_ok=True)
        for i, (caption, image) in enumerate(zip(captions, after)):
            image_io.save_png(folder / "images" / f"{i:05d}.png", image,
                              {"prompt": caption, "seed": int(section.seed) + i, **settings})
        for name, images in (("before", before), ("after", after)):
            image_io.save_png(folder / f"{name}.png", image_io.image_grid(np.stack(images[:_GRID]), columns=4),
                              {"prompts": captions[:_GRID], **settings, "noise_optimised": name == "after"})
        paths.write_text(workdir / "noise_evaluation.json", json.dumps(results, indent=2) + "\n")
    return results
