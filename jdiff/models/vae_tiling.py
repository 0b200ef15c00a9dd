"""Tiled VAE encode and decode, so images far larger than the VAE was made for fit in memory.

The image (or latent) is cut into overlapping square tiles, each tile goes through the VAE on its
own, and neighbouring tiles are blended linearly across the overlap, in the order and with the
weights of diffusers' `AutoencoderKL.enable_tiling()`: tiles of `tile` pixels (default: the VAE's
`sample_size`) every 3/4 tile, each blended with the finished tile above it and then with the one
to its left, keeping the first 3/4 of every tile. Results therefore equal diffusers' tiled output,
not the untiled one (GroupNorm statistics are per tile).

Tiles of one shape run in one `lax.map`, so the compiled program holds one tile's activations at a
time. Tiles overlap, so the last two tiles of a row or column can both be cut short: there are at
most three tile sizes per axis, usually two (SD's 2048x2048 decode: 64 and 16 latents).
"""

import jax
import jax.numpy as jnp
from jax import lax

from jdiff.models.vae import DiagonalGaussian

OVERLAP = 0.25  # diffusers' tile_overlap_factor


def _tile_starts(size: int, stride: int) -> list[int]:
    return list(range(0, size, stride))


def _map_tiles(fn, x: jax.Array, tile: int, stride: int) -> tuple[dict, int, int]:
    """fn applied to every tile of x [B, H, W, C]: tiles start every `stride` pixels and are
    `tile` wide, cut short at the bottom and right edges. Returns {(row, column): output}."""
    rows, cols = _tile_starts(x.shape[1], stride), _tile_starts(x.shape[2], stride)
    by_shape: dict = {}
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            by_shape.setdefault((min(tile, x.shape[1] - top), min(tile, x.shape[2] - left)), []).append((i, j))
    outputs = {}
    for (height, width), members in by_shape.items():
        stack = jnp.stack([x[:, rows[i]:rows[i] + height, cols[j]:cols[j] + width] for i, j in members])
        results = lax.map(fn, stack)
        outputs.update({member: results[k] for k, member in enumerate(members)})
    return outputs, len(rows), len(cols)


def _blend(before: jax.Array, tile: jax.Array, extent: int, axis: int) -> jax.Array:
    """The first `extent` rows (axis 1) or columns (axis 2) of `tile` faded in from the last ones
    of `before`: weight y / extent for the tile's own row y."""
    extent = min(before.shape[axis], tile.shape[axis], extent)
    if extent == 0:
        return tile
    shape = [1] * tile.ndim
    shape[axis] = extent
    weight = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape)
    tail = lax.slice_in_dim(before, before.shape[axis] - extent, before.shape[axis], axis=axis)
    head = lax.slice_in_dim(tile, 0, extent, axis=axis)
    mixed = (tail.astype(jnp.float32) * (1 - weight) + head.astype(jnp.float32) * weight).astype(tile.dtype)
    return jnp.concatenate([mixed, lax.slice_in_dim(tile, extent, tile.shape[axis], axis=axis)], axis=axis)


def _stitch(tiles: dict, num_rows: int, num_cols: int, extent: int, keep: int) -> jax.Array:
    """Row by row, each tile blended with the finished tile above, then with the finished tile to
    its left; the first `keep` rows and columns of each finished tile make the output."""
    finished, rows = {}, []
    for i in range(num_rows):
        row = []
        for j in range(num_cols):
            tile = tiles[i, j]
            if i > 0:
                tile = _blend(finished[i - 1, j], tile, extent, axis=1)
            if j > 0:
                tile = _blend(finished[i, j - 1], tile, extent, axis=2)
            finished[i, j] = tile
            row.append(tile[:, :keep, :keep])
        rows.append(jnp.concatenate(row, axis=2))
    return jnp.concatenate(rows, axis=1)


def default_tile(vae) -> int:
    """diffusers' tile size: the VAE config's sample_size, in pixels."""
    size = vae.config.sample_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _tiled(run, x: jax.Array, tile_in: int, tile_out: int) -> jax.Array:
    """run(x), or run on tiles of `tile_in` pixels of x stitched into tiles of `tile_out` pixels of
    the output, when tile_in > 0 and x is larger than one tile."""
    if not tile_in or max(x.shape[1:3]) <= tile_in:
        return run(x)
    tiles, num_rows, num_cols = _map_tiles(run, x, tile_in, int(tile_in * (1 - OVERLAP)))
    extent = int(tile_out * OVERLAP)
    return _stitch(tiles, num_rows, num_cols, extent, tile_out - extent)


def decode(vae, params, latents: jax.Array, tile: int = 0) -> jax.Array:
    """vae.decode(latents), in tiles of `tile` pixels when tile > 0 and the image is larger."""
    run = lambda z: vae.apply({"params": params}, z, method="decode")  # noqa: E731
    return _tiled(run, latents, tile // vae.config.downscale, tile)


def encode_moments(vae, params, images: jax.Array, tile: int = 0) -> jax.Array:
    """The encoder's moments [B, h, w, 2C] (mean and log-variance, before the clip), tiled as
    `decode` when tile > 0 and the image is larger than a tile."""
    run = lambda x: vae.apply({"params": params}, x, method="encode_moments")  # noqa: E731
    return _tiled(run, images, tile, tile // vae.config.downscale)


def encode(vae, params, images: jax.Array, tile: int = 0):
    """vae.encode(images) -> DiagonalGaussian, tiled as `encode_moments`."""
    return DiagonalGaussian.from_moments(encode_moments(vae, params, images, tile).astype(jnp.float32))
