"""Fixed-size batches over a sequence: the last batch is padded by repeating its last item, so a
jitted function sees one shape (one compile) however many items there are."""

from typing import Callable, Iterator

import jax
import numpy as np


def padded_batches(count: int, batch_size: int) -> Iterator[tuple[list[int], int]]:
    """(indices, real) for each batch over range(count): `batch_size` indices, of which the first
    `real` are new and the rest repeat the last one."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    for start in range(0, count, batch_size):
        real = min(batch_size, count - start)
        yield list(range(start, start + real)) + [start + real - 1] * (batch_size - real), real


def map_batches(fn: Callable, array: np.ndarray, batch_size: int):
    """fn applied to `array` ([N, ...]) in padded fixed-size batches; the outputs (arrays or a
    pytree of them, batch-major) concatenated with the padding dropped, as numpy."""
    outputs = []
    for indices, real in padded_batches(len(array), batch_size):
        outputs.append(jax.tree.map(lambda a: np.asarray(a)[:real], fn(array[indices])))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
