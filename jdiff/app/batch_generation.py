"""Batch generation for sample.py: fixed-size batches (one compile), PNGs with metadata, a grid,
progress, and the compile time and throughput at the end."""

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jdiff import image_io
from jdiff.batching import padded_batches
from jdiff.pipeline import Pipeline, generate
from jdiff.app.prompts import Job

_compile_seconds = [0.0]


def _count_compile(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def enable_compilation_cache(folder) -> None:
    """JAX's persistent cache: later runs with the same shapes skip XLA compilation."""
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@dataclasses.dataclass
class RunStats:
    images: int
    seconds: float
    compile_seconds: float
    first_batch_seconds: float
    first_batch_images: int = 0

    def summary(self) -> str:
        steady = self.seconds - self.first_batch_seconds
        rate = f"{(self.images - self.first_batch_images) / steady:.2f} images/s after the first batch" \
            if steady > 0 and self.images > self.first_batch_images else f"{self.images / self.seconds:.2f} images/s"
        return (f"{self.images} images in {self.seconds:.1f} s; compile {self.compile_seconds:.1f} s; "
                f"first batch (with compile) {self.first_batch_seconds:.1f} s; {rate}")


@dataclasses.dataclass(frozen=True)
class Refiner:
    """A second model that finishes each image (SDXL's refiner): the base runs the noisiest
    `high_noise_frac` of the noise levels and hands its latents over; `settings` are the refiner's
    own generate() settings (its sampler), the rest are the base's."""

    pipe: Pipeline
    high_noise_frac: float
    settings: dict = dataclasses.field(default_factory=dict)


def generate_batch(pipe: Pipeline, prompts, negatives, seeds, settings: dict, refiner: Refiner = None):
    """Images for one batch: from `pipe` alone, or handed from `pipe` to `refiner` part-way."""
    kw = dict(negative_prompts=negatives, seed=seeds)
    if refiner is None:
        return generate(pipe, prompts, **kw, **settings)
    latents = generate(pipe, prompts, **kw, **settings, denoising_end=refiner.high_noise_frac, output_type="latent")
    # The base's LoRA adapters are the base's own: the refiner runs as it is.
    finish = {k: v for k, v in settings.items() if k not in ("height", "width", "lora_scales")}
    return generate(refiner.pipe, prompts, **kw, **{**finish, **refiner.settings}, init_latents=latents,
                    denoising_start=refiner.high_noise_frac)


def run(pipe: Pipeline, jobs: list[Job], out: Path, batch_size: int, settings: dict,
        metadata: dict = {}, refiner: Refiner = None) -> RunStats:
    """Generates every job in batches of `batch_size` (the last one padded, so all batches share
    one compiled program) and writes out/NNNNN.png plus out/grid.png. Each PNG's text metadata
    holds its prompt, seed, the scalar settings and `metadata` (e.g. input file names)."""
    main = jax.process_index() == 0  # every process generates its share; process 0 writes the files
    if main:
        out.mkdir(parents=True, exist_ok=True)
    start, compile_start = time.perf_counter(), _compile_seconds[0]
    stats = RunStats(0, 0.0, 0.0, 0.0)
    images = []
    with tqdm(total=len(jobs), unit="img", desc="sampling", disable=not main) as bar:
        for indices, real in padded_batches(len(jobs), batch_size):
            first, padded = indices[0], [jobs[i] for i in indices]
            batch = padded[:real]
            result = generate_batch(pipe, [j.prompt for j in padded], [j.negative_prompt for j in padded],
                                    [j.seed for j in padded], settings, refiner)[:real]
            for k, (job, image) in enumerate(zip(batch, result) if main else ()):
                parameters = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed,
                              "model": pipe.source, **metadata, **{key: v for key, v in settings.items() if _printable(v)}}
                image_io.save_png(out / f"{first + k:05d}.png", image, parameters)
            images.append(result)
            if first == 0:
                stats.first_batch_seconds = time.perf_counter() - start
                stats.first_batch_images = len(batch)
            bar.update(len(batch))
    grid = np.concatenate(images)
    if main:
        image_io.save_png(out / "grid.png", image_io.image_grid(grid), {"prompts": [j.prompt for j in jobs]})
    stats.images, stats.seconds = len(jobs), time.perf_counter() - start
    stats.compile_seconds = _compile_seconds[0] - compile_start
    return stats


def _printable(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
