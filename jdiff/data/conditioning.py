"""A training set whose conditioning was computed once: with the text encoders frozen, a caption's
encoding never changes, so the diffusion stage can read it (like `data.cache_latents` reads VAE
posteriors) instead of running the text encoders at every step.

    source = encode_conditioning(encode, source)   # encode: examples -> pytree of [B, ...] arrays
    source[i]                                      # source's example i plus its computed fields
"""

from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from jdiff.batching import padded_batches
from jdiff.data.latents import numeric_fields
from jdiff.data.loader import decode_example


class ConditionedSource:
    """`source` (len, [i] -> dict) with per-example arrays added to every example: `computed` is a
    dict (of dicts) of arrays [N, ...], held in memory (every process holds them all)."""

    def __init__(self, source, computed: dict):
        lengths = {len(leaf) for leaf in jax.tree.leaves(computed)}
        if lengths - {len(source)}:
            raise ValueError(f"{len(source)} examples but computed fields of lengths {sorted(lengths)}")
        self.source, self.computed = source, computed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return {**self.source[index], **jax.tree.map(lambda a: a[index], self.computed)}


PIXELS = ("image", "latent_mean", "latent_logvar")  # what conditioning is never made of


def text_and_fields(items: list[dict]) -> dict:
    """A list of examples as one batch of what conditioning is made of: "caption" (numpy str
    [B]) and the examples' numeric fields stacked (no images or latents)."""
    fields = [{k: v for k, v in numeric_fields(item).items() if k not in PIXELS} for item in items]
    return {"caption": np.array([str(item.get("caption", "")) for item in items]),
            **{k: np.stack([f[k] for f in fields]) for k in fields[0]}}


def encode_conditioning(encode: Callable[[dict], dict], source, batch_size: int = 64,
                        show_progress: bool = True) -> ConditionedSource:
    """`encode(text_and_fields(examples))` for every example of `source`, in fixed-size batches
    (the last one padded, so a jitted `encode` compiles once). Reading an image source decodes its
    images once more; with `cache_latents` the source is a `LatentSource` and reading is free."""
    parts = []
    batches = padded_batches(len(source), batch_size)
    for indices, real in tqdm(batches, total=-(-len(source) // batch_size), desc="encoding captions",
                              unit="batch", disable=not show_progress):
        encoded = encode(text_and_fields([decode_example(source[i]) for i in indices]))
        parts.append(jax.tree.map(lambda a: np.asarray(a)[:real], encoded))
    return ConditionedSource(source, jax.tree.map(lambda *p: np.concatenate(p), *parts))
