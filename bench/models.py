"""jdiff vs diffusers (PyTorch) on this machine: SD1.5-shaped U-Net forward and VAE decode, float32.

Both sides run the same random weights (written by diffusers with `save_pretrained`, loaded by
jdiff), in one process, one after the other, each with a warm-up call first.

    python bench/models.py                 # both benchmarks, results to bench/results/models.json
    python bench/models.py --only unet --repeats 3
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from report import seconds, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdiff.convert import load_unet, load_vae  # noqa: E402

SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # the rest are diffusers' defaults (SD1.5)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
)


def nchw_to_nhwc(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1)


def compare(name, torch_fn, jax_fn, jax_args, repeats, extra, to_jax_layout=nchw_to_nhwc):
    """Times torch_fn and the compiled jax_fn(*jax_args) (best of `repeats` after a warm-up) and
    checks they agree; to_jax_layout turns PyTorch's output into jdiff's layout."""
    print(f"[{name}] PyTorch warm-up and {repeats} runs...", flush=True)
    with torch.no_grad():
        torch_ref = torch_fn()
        torch_times = seconds(torch_fn, repeats)

    print(f"[{name}] jdiff compile and {repeats} runs...", flush=True)
    start = time.perf_counter()
    compiled = jax.jit(jax_fn).lower(*jax_args).compile()
    compile_s = time.perf_counter() - start
    out = compiled(*jax_args).block_until_ready()
    jax_times = seconds(lambda: compiled(*jax_args).block_until_ready(), repeats)

    ref = to_jax_layout(torch_ref.numpy())
    error = float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))
    result = dict(
        name=name, **extra,
        torch_s=min(torch_times), jdiff_s=min(jax_times),
        ratio_jdiff_over_torch=min(jax_times) / min(torch_times),
        jdiff_compile_s=compile_s, max_rel_error=error,
        torch_runs=torch_times, jdiff_runs=jax_times,
    )
    print(f"[{name}] PyTorch {result['torch_s']:.2f} s, jdiff {result['jdiff_s']:.2f} s "
          f"(ratio {result['ratio_jdiff_over_torch']:.2f}), compile {compile_s:.1f} s, rel. error {error:.1e}",
          flush=True)
    return result


def bench_unet(folder: Path, repeats: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**SD15_UNET).eval()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    model.save_pretrained(folder / "unet")
    x = torch.randn(2, 4, 64, 64)
    t = torch.tensor([999.0, 500.0])
    ctx = torch.randn(2, 77, 768)
    module, params = load_unet(folder / "unet")
    args = (params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    fn = lambda p, x, t, c: module.apply({"params": p}, x, t, c)
    result = compare("unet_sd15_forward_b2_64x64", lambda: model(x, t, ctx).sample, fn, args, repeats,
                     dict(params_millions=round(params_m, 2), batch=2, latent="64x64x4", context="77x768"))
    del model
    return result


def bench_vae(folder: Path, repeats: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**SD15_VAE).eval()
    model.save_pretrained(folder / "vae")
    z = torch.randn(1, 4, 64, 64)
    module, params = load_vae(folder / "vae")
    args = (params, jnp.asarray(z.numpy().transpose(0, 2, 3, 1)))
    fn = lambda p, z: module.apply({"params": p}, z, method=module.decode)
    return compare("vae_sd15_decode_b1_512x512", lambda: model.decode(z).sample, fn, args, repeats,
                   dict(batch=1, latent="64x64x4", image="512x512x3"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["unet", "vae"], default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "models.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "unet"):
            results.append(bench_unet(Path(tmp), args.repeats))
        if args.only in (None, "vae"):
            results.append(bench_vae(Path(tmp), args.repeats))

    write_report(args.out, results)


if __name__ == "__main__":
    main()
