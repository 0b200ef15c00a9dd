"""A training set whose images were encoded once by a frozen VAE: the diffusion stage then draws its
latents from the stored posteriors instead of running the encoder on every batch.

    source = encode_source(encode, images_source)   # encode: images [B,H,W,3] -> (mean, logvar)
    loader = make_loader(source, batch_size=32, seed=0)  # batches of latent_mean, latent_logvar, caption
"""

from typing import Callable

import numpy as np
from tqdm import tqdm

from jdiff.batching import padded_batches
from jdiff.data.loader import decode_example, to_model_range


class LatentSource:
    """Posterior means and log-variances (float32 [N, h, w, c]) with their captions, in memory;
    a random-access source for `make_loader` like the image sources it replaces. `fields`: the
    source examples' other numeric fields ([N, ...] each), kept because a family may condition on
    them (an image folder's "original_size" and "crop_top_left", SDXL's micro-conditioning)."""

    def __init__(self, mean: np.ndarray, logvar: np.ndarray, captions: list[str],
                 fields: dict[str, np.ndarray] | None = None):
        fields = fields or {}
        lengths = {len(mean), len(logvar), len(captions)} | {len(v) for v in fields.values()}
        if len(lengths) != 1:
            raise ValueError(f"{len(mean)} means, {len(logvar)} log-variances, {len(captions)} captions and "
                             f"fields of lengths {({k: len(v) for k, v in fields.items()})}")
        self.mean, self.logvar, self.captions, self.fields = mean, logvar, captions, fields

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return {"latent_mean": self.mean[index], "latent_logvar": self.logvar[index], "caption": self.captions[index],
                **{k: v[index] for k, v in self.fields.items()}}


def numeric_fields(example: dict) -> dict:
    """An example's fields other than its image and caption that are numbers or numeric arrays."""
    return {k: v for k, v in example.items()
            if k not in ("image", "caption") and np.asarray(v).dtype.kind in "biuf"}


def encode_source(encode: Callable[[np.ndarray], tuple], source, batch_size: int = 100,
                  show_progress: bool = True) -> LatentSource:
    """Encodes every example of `source` (dicts with uint8 "image" and "caption") in fixed-size
    batches (the last one padded, so `encode` compiles once)."""
    means, logvars, captions, fields = [], [], [], []
    batches = padded_batches(len(source), batch_size)
    for indices, real in tqdm(batches, total=-(-len(source) // batch_size), desc="encoding latents", unit="batch",
                              disable=not show_progress):
        items = [decode_example(source[i]) for i in indices]
        mean, logvar = encode(to_model_range(np.stack([item["image"] for item in items])))
        means.append(np.asarray(mean)[:real])
        logvars.append(np.asarray(logvar)[:real])
        captions.extend(str(item.get("caption", "")) for item in items[:real])
        fields.extend(numeric_fields(item) for item in items[:real])
    kept = {k: np.stack([f[k] for f in fields]) for k in fields[0]} if fields else {}
    return LatentSource(np.concatenate(means), np.concatenate(logvars), captions, kept)
