"""Batch generation for sample.py: fixed-size batches (one compile), PNGs with metadata written as
each batch finishes, resuming an interrupted run, progress, and the compile time and throughput."""

import dataclasses
import time

import jax
import numpy as np
from tqdm import tqdm

from jdiff import distributed, executable_cache, image_io
from jdiff.app import sample_outputs
from jdiff.app.prompts import ENCODER_PROMPT_KEYS, Job, bucket_for
from jdiff.batching import padded_batches
from jdiff.errors import ConfigError
from jdiff.paths import Path
from jdiff.pipeline import Pipeline, generate

_compile_seconds = [0.0]


def _count_compile(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def enable_compilation_cache(folder, executables: bool = False) -> None:
    """JAX's persistent cache: later runs with the same shapes skip XLA compilation. executables:
    also keep generate()'s compiled programs whole in folder/executables, so later runs skip
    tracing and lowering too (jdiff.executable_cache)."""
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if executables:
        executable_cache.enable(Path(folder) / "executables")


@dataclasses.dataclass
class RunStats:
    images: int
    seconds: float
    compile_seconds: float
    first_batch_seconds: float
    first_batch_images: int = 0
    skipped: int = 0  # already on disk from an earlier run of the same command
    written: int = 0  # PNGs this process wrote (hosts that share the folder split the writing)

    def summary(self) -> str:
        if self.images == 0:
            return f"all {self.skipped} images were already written"
        steady = self.seconds - self.first_batch_seconds
        rate = f"{(self.images - self.first_batch_images) / steady:.2f} images/s after the first batch" \
            if steady > 0 and self.images > self.first_batch_images else f"{self.images / self.seconds:.2f} images/s"
        kept = f" ({self.skipped} kept from an earlier run)" if self.skipped else ""
        return (f"{self.images} images{kept} in {self.seconds:.1f} s; compile {self.compile_seconds:.1f} s; "
                f"first batch (with compile) {self.first_batch_seconds:.1f} s; {rate}")


@dataclasses.dataclass(frozen=True)
class Refiner:
    """A second model that finishes each image (SDXL's refiner): the base runs the noisiest
    `high_noise_frac` of the noise levels and hands its latents over; `settings` are the refiner's
    own generate() settings (its sampler), the rest are the base's."""

    pipe: Pipeline
    high_noise_frac: float
    settings: dict = dataclasses.field(default_factory=dict)


def encoder_prompts(jobs: list[Job]) -> dict:
    """generate()'s prompts_2 / negative_prompts_2 / prompts_3 / negative_prompts_3 of a batch, for
    the ones any job sets (None entries: that job's prompt or negative prompt)."""
    given = [dict(job.encoder_prompts) for job in jobs]
    return {key.replace("prompt", "prompts"): [g.get(key) for g in given]
            for key in ENCODER_PROMPT_KEYS if any(key in g for g in given)}


def generate_batch(pipe: Pipeline, prompts, negatives, seeds, settings: dict, refiner: Refiner = None,
                   texts: dict | None = None):
    """Images for one batch: from `pipe` alone, or handed from `pipe` to `refiner` part-way. `texts`:
    the other text encoders' prompts (encoder_prompts)."""
    kw = dict(negative_prompts=negatives, seed=seeds, **(texts or {}))
    if refiner is None:
        return generate(pipe, prompts, **kw, **settings)
    latents = generate(pipe, prompts, **kw, **settings, denoising_end=refiner.high_noise_frac, output_type="latent")
    # The base's LoRA adapters and ControlNets are the base's own: the refiner runs as it is.
    own = ("height", "width", "lora_scales", "control_image", "controlnet_conditioning_scale",
           "control_guidance_start", "control_guidance_end", "guess_mode", "ip_adapter_image", "ip_adapter_scale",
           "ip_adapter_mask")
    finish = {k: v for k, v in settings.items() if k not in own}
    return generate(refiner.pipe, prompts, **kw, **{**finish, **refiner.settings}, init_latents=latents,
                    denoising_start=refiner.high_noise_frac)


def _wanted(pipe: Pipeline, job: Job, settings: dict) -> tuple[int, int]:
    """The size a job asks for: its own, else the run's, else the model's default."""
    return (job.height or settings.get("height") or pipe.default_size,
            job.width or settings.get("width") or pipe.default_size)


def _batches(pipe: Pipeline, jobs: list[Job], batch_size: int, settings: dict, buckets) -> list[tuple]:
    """(job indices, how many are real, the (height, width) they are drawn at) of every batch: jobs
    grouped by that size (their own, else the run's; None: what generate() decides, the model's or
    an input image's; with `buckets`, the bucket it falls in), each group in fixed-size batches, so
    a run compiles once per size."""
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        size = (job.height or settings.get("height"), job.width or settings.get("width"))
        if buckets:
            size = bucket_for(*_wanted(pipe, job, settings), buckets)
        groups.setdefault(size, []).append(index)
    return [([group[i] for i in indices], real, size)
            for size, group in groups.items() for indices, real in padded_batches(len(group), batch_size)]


def run(pipe: Pipeline, jobs: list[Job], out: Path, batch_size: int, settings: dict,
        metadata: dict = {}, refiner: Refiner = None, overwrite: bool = False,
        buckets: list[tuple[int, int]] | None = None) -> RunStats:
    """Generates every job in batches of `batch_size` (the last one padded, so all batches share
    one compiled program) into out/NNNNN.png, out/manifest.jsonl and out/grid.png (the first 64).
    Jobs of different sizes go in different batches, one compiled program per size. With `buckets`
    ([(height, width), ...]), every job is drawn at the bucket of the nearest aspect ratio
    (`prompts.bucket_for`) and scaled and centre-cropped to its own size (`image_io.fit`): mixed
    sizes and aspect ratios compile at most once per bucket. The manifest lists images in the order
    they were drawn (index order when all have one size).
    Each PNG's metadata holds its prompt, seed, the scalar settings and `metadata` (e.g. input file
    names). Images are written as each batch finishes and then dropped, so memory does not grow with
    the number of jobs. A rerun of the same command keeps the batches already on disk
    (`sample_outputs`); `overwrite` starts afresh.

    Several hosts: every process generates each batch on its share of the devices (the prompts of a
    batch are split over every device of every host). Process 0 checks the folder and writes the
    run record, the manifest and the grid. When every host sees the folder (a shared file system,
    `gs://`), each process writes the PNGs of its own images (index % process count ==
    process index), so encoding and uploading are split too; otherwise process 0 writes them all."""
    out = Path(out)
    main = jax.process_index() == 0
    printable = {key: v for key, v in settings.items() if _printable(v)}
    batches = _batches(pipe, jobs, batch_size, settings, buckets)
    # Process 0 checks the folder and finds the finished batches; all processes follow its decision
    # (whatever goes wrong there is broadcast too, so no process waits in a collective alone).
    decision = np.zeros(1 + len(batches), np.int32)
    kept, failure = [None] * len(batches), None
    if main:
        try:
            record = sample_outputs.run_record(pipe.source, jobs, batch_size, {**printable, **metadata})
            sample_outputs.prepare(out, record, overwrite)
            kept = [sample_outputs.kept_entries(out, indices[:real]) for indices, real, _ in batches]
            decision[0] = 1
            decision[1:] = [entries is not None for entries in kept]
        except Exception as error:  # noqa: BLE001 - re-raised below, after the others have heard of it
            failure = error
    decision = distributed.from_main(decision)
    if failure is not None:
        raise failure
    if not decision[0]:
        raise ConfigError(f"process 0 could not use the output folder {out}: see its message.")
    done = decision[1:].astype(bool)
    # Process 0 has written the run record: every host that can see it shares the folder.
    shared = distributed.all_processes((out / sample_outputs.RECORD).is_file())
    processes, process = jax.process_count(), jax.process_index()
    writes = (lambda index: index % processes == process) if shared else (lambda index: main)
    manifest = sample_outputs.Manifest(out) if main else None
    skipped = sum(real for (_, real, _), skip in zip(batches, done) if skip)
    start, compile_start = time.perf_counter(), _compile_seconds[0]
    stats = RunStats(0, 0.0, 0.0, 0.0, skipped=skipped)
    with tqdm(total=len(jobs), initial=skipped, unit="img", desc="sampling", disable=not main) as bar:
        for (indices, real, (height, width)), skip, entries in zip(batches, done, kept):
            if skip:
                if main:
                    manifest.add(entries)  # in the order an uninterrupted run writes them
                continue
            padded = [jobs[i] for i in indices]
            result = generate_batch(pipe, [j.prompt for j in padded], [j.negative_prompt for j in padded],
                                    [j.seed for j in padded], {**settings, "height": height, "width": width},
                                    refiner, encoder_prompts(padded))[:real]
            entries = []
            for index, image in zip(indices[:real], result):
                job = jobs[index]
                parameters = {"prompt": job.prompt, "negative_prompt": job.negative_prompt,
                              **dict(job.encoder_prompts), "seed": job.seed, "model": pipe.source, **metadata,
                              **printable}
                wanted = _wanted(pipe, job, settings)
                if job.height or job.width:
                    parameters.update(height=wanted[0], width=wanted[1])
                if buckets and wanted != image.shape[:2]:  # drawn in a bucket of another size
                    parameters.update(bucket=f"{width}x{height}", height=wanted[0], width=wanted[1])
                    image = image_io.fit(image, *wanted)
                if writes(index):
                    image_io.save_png(out / sample_outputs.image_name(index), image, parameters)
                    stats.written += 1
                entries.append(sample_outputs.manifest_entry(index, parameters, *image.shape[:2]))
            if main:
                manifest.add(entries)
            if stats.images == 0:
                stats.first_batch_seconds = time.perf_counter() - start
                stats.first_batch_images = real
            stats.images += real
            bar.update(real)
    distributed.barrier("sample.py images written")  # the grid reads images other hosts wrote
    if main:
        manifest.close()
        sample_outputs.write_grid(out, len(jobs), [j.prompt for j in jobs])
    stats.seconds = time.perf_counter() - start
    stats.compile_seconds = _compile_seconds[0] - compile_start
    return stats


def _printable(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
