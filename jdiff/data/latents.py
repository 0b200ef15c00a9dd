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
    a random-access source for `make_loader` like the image sources it replaces."""

    def __init__(self, mean: np.ndarray, logvar: np.ndarray, captions: list[str]):
        if not len(mean) == len(logvar) == len(captions):
            raise ValueError(f"{len(mean)} means, {len(logvar)} log-variances and {len(captions)} captions")
        self.mean, self.logvar, self.captions = mean, logvar, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return {"latent_mean": self.mean[index], "latent_logvar": self.logvar[index], "caption": self.captions[index]}


def encode_source(encode: Callable[[np.ndarray], tuple], source, batch_size: int = 100,
                  show_progress: bool = True) -> LatentSource:
    """Encodes every example of `source` (dicts with uint8 "image" and "caption") in fixed-size
    batches (the last one padded, so `encode` compiles once)."""
    means, logvars, captions = [], [], []
    batches = padded_batches(len(source), batch_size)
    for indices, real in tqdm(batches, total=-(-len(source) // batch_size), desc="encoding latents", unit="batch",
                              disable=not show_progress):
        items = [decode_example(source[i]) for i in indices]
        mean, logvar = encode(to_model_range(np.stack([item["image"] for item in items])))
        means.append(np.asarray(mean)[:real])
        logvars.append(np.asarray(logvar)[:real])
        captions.extend(str(item.get("caption", "")) for item in items[:real])
    return LatentSource(np.concatenate(means), np.concatenate(logvars), captions)
