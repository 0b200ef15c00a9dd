"""The training input pipeline: a random-access source to deterministic, sharded, resumable batches.

Built on grain's dataset API. Every step before batching is a function of an element's index, so the
order of examples depends only on (seed, shard) and a checkpointed iterator state (a small dict:
how many examples were consumed) resumes with exactly the batches an uninterrupted run would see.

    loader = make_loader(load_shapes(data_dir), batch_size=64, seed=0)
    it = iter(loader)
    batch = next(it)       # {"image": float32 [64, R, R, 3] in [-1, 1], "caption": str [64], ...}
    state = it.get_state() # save with the model; later: it = iter(loader); it.set_state(state)
"""

from typing import Callable

import grain
import jax
import numpy as np

from jdiff.errors import ConfigError


def decode_example(example: dict) -> dict:
    """The default per-example transform: captions as `str` (tfds stores UTF-8 bytes). Images stay
    uint8 until they are batched, so read-ahead buffers hold a quarter of the bytes."""
    example = dict(example)
    if isinstance(example.get("caption"), bytes):
        example["caption"] = example["caption"].decode("utf-8")
    return example


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], the range the VAE and pixel-space models train on."""
    return np.asarray(images, np.float32) * (2.0 / 255.0) - 1.0


def steps_per_epoch(size: int, batch_size: int, shard_count: int = 1) -> int:
    """Global batches in one pass over the data (batch_size per process; the rest is dropped)."""
    return size // (batch_size * shard_count)


def _check(source, batch_size, seed, num_epochs, shard_index, shard_count) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer (got {batch_size!r}).")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ConfigError(f"data seed must be an integer in [0, 2**32) (got {seed!r}).")
    if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or num_epochs <= 0):
        raise ConfigError(f"num_epochs must be a positive integer or None for endless (got {num_epochs!r}).")
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index must be in [0, shard_count={shard_count}) (got {shard_index}).")
    if len(source) == 0:
        raise ConfigError("the data source is empty.")
    if num_epochs is not None and len(source) * num_epochs < batch_size * shard_count:
        raise ConfigError(f"{num_epochs} epoch(s) of {len(source)} examples cannot fill one global batch of "
                          f"{batch_size} x {shard_count} processes.")


def make_loader(source, *, batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                shard_index: int | None = None, shard_count: int | None = None,
                transform: Callable[[dict], dict] = decode_example,
                tokenize: Callable[[list[str]], object] | None = None,
                augment: grain.transforms.RandomMap | None = None,
                num_threads: int = 4, prefetch: int = 256) -> grain.IterDataset:
    """This process's part of every global batch of `source` (anything with len and [i] -> dict).

    source:      e.g. `load_shapes(...)` or `ImageFolder(...)`; elements are dicts with "image"
                 (uint8 [H, W, 3]) and usually "caption".
    batch_size:  examples per batch on this process; a global batch is batch_size x shard_count.
    seed:        the shuffle order; each epoch is a fresh permutation derived from it.
    num_epochs:  None repeats forever; batches may straddle epoch boundaries.
    shard_index, shard_count: default to jax.process_index() / jax.process_count(). Every process
                 walks the same global order and reads only its own block of each global batch, so
                 the global batches (and a run's losses) are the same on any number of hosts.
    transform:   applied to every example before batching (runs in the read threads).
    tokenize:    optional, maps the batch's list of captions to token ids, stored as batch["ids"].
    augment:     optional random transform of every example (e.g. `augment.CropAndFlip`), its draws
                 a function of the seed and the example's place in the stream (each epoch afresh).
    num_threads, prefetch: read-ahead threads and buffered examples; they never change the order.

    Batches have exactly `batch_size` examples: "image" float32 [B, H, W, 3] in [-1, 1] (when the
    transform left it uint8), "caption" a numpy array of str, other fields stacked. Iterate with
    `iter(loader)`; the iterator's `get_state()` / `set_state()` checkpoint and resume it.
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    _check(source, batch_size, seed, num_epochs, shard_index, shard_count)
    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=int(seed))
    # After shuffle, so each epoch gets its own permutation (grain reseeds per epoch).
    dataset = dataset.repeat(num_epochs)
    if augment is not None:
        dataset = dataset.random_map(augment, seed=int(seed))
    dataset = dataset.map(transform).batch(int(batch_size), drop_remainder=True)
    if num_epochs is not None:  # whole global batches only, so every process runs the same steps
        dataset = dataset[:len(dataset) // shard_count * shard_count]
    dataset = dataset[shard_index::shard_count]  # lazy: only this process's blocks are ever read
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return dataset.to_iter_dataset(read_options).map(_BatchFinisher(tokenize))


class _BatchFinisher:
    """Per-batch work: float images, and token ids in one tokenizer call per batch (not per example).
    A class rather than a closure so the pipeline stays picklable for grain's worker processes."""

    def __init__(self, tokenize):
        self.tokenize = tokenize

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        for key in batch:  # "image", and paired pictures such as DreamBooth's "class_image"
            if (key == "image" or key.endswith("_image")) and batch[key].dtype == np.uint8:
                batch[key] = to_model_range(batch[key])
        if self.tokenize is not None:
            batch["ids"] = self.tokenize([str(c) for c in batch["caption"]])
        return batch
