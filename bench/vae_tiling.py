"""Compiled memory of the SD1.5-shaped VAE's decode and encode, untiled against tiled (tiles of its
sample_size, 512 px, as diffusers' enable_tiling), at growing image sizes; nothing is run or
allocated (XLA's memory analysis of the compiled program, batch 1, float32 and bfloat16).

    python bench/vae_tiling.py            # results to bench/results/vae_tiling.json
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdiff.models import vae_tiling  # noqa: E402
from jdiff.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from models import SD15_VAE  # noqa: E402
from report import write_report  # noqa: E402


def peak_gib(compiled) -> float:
    m = compiled.memory_analysis()
    return round((m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                  + m.temp_size_in_bytes) / 2**30, 3)


def measure(vae, params, direction: str, side: int, tile: int) -> dict:
    f = vae.config.downscale
    if direction == "decode":
        x = jax.ShapeDtypeStruct((1, side // f, side // f, vae.config.latent_channels), jnp.float32)
        fn = lambda p, a: vae_tiling.decode(vae, p, a, tile)  # noqa: E731
    else:
        x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
        fn = lambda p, a: vae_tiling.encode_moments(vae, p, a, tile)  # noqa: E731
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params, x).compile()
    return dict(peak_gib=peak_gib(compiled), compile_s=round(time.perf_counter() - start, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "vae_tiling.json"))
    args = parser.parse_args()

    config = VAEConfig.from_dict(SD15_VAE)
    results = []
    for dtype in args.dtypes:
        vae = AutoencoderKL(config, dtype=jnp.dtype(dtype))
        params = jax.eval_shape(lambda: vae.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"])
        tile = vae_tiling.default_tile(vae)
        for direction in ("decode", "encode"):
            for side in args.sizes:
                row = dict(direction=direction, dtype=dtype, image=f"{side}x{side}", tile=tile,
                           untiled=measure(vae, params, direction, side, 0),
                           tiled=measure(vae, params, direction, side, tile))
                row["ratio"] = round(row["untiled"]["peak_gib"] / row["tiled"]["peak_gib"], 2)
                print(row, flush=True)
                results.append(row)
    write_report(args.out, results, note="peak = arguments + outputs - aliased + temporaries of the compiled "
                                         "program (XLA:CPU's memory analysis), batch 1, params float32")


if __name__ == "__main__":
    main()
