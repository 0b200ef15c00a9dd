"""Helpers for comparing jdiff outputs with the PyTorch reference."""

import numpy as np


def max_rel_error(ours, reference) -> float:
    """Max absolute difference relative to the reference's scale (its max absolute value)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-12))


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def randomize_torch(module, scale: float = 0.5, seed: int = 0):
    """Gives every parameter of a torch module random values, so no layer is an identity or a zero.

    Fresh diffusers models zero some output layers; parity on those would prove little.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 4
                p.copy_(scale * torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return module.eval()


def same_params(a, b) -> bool:
    """Whether two parameter trees hold the same leaves, bit for bit (their paths must match)."""
    import jax

    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    return all(np.array_equal(x, y) for (_, x), (_, y) in zip(flat_a, flat_b))
