"""jdiff vs diffusers (PyTorch) on this machine: the SDXL-base-shaped U-Net (2.57B parameters) forward
at 128x128x4 latents, batch 1, 77x2048 context, pooled text 1280 and 6 time ids, float32.

Both sides run the same random weights and inputs. Two float32 copies (10.3 GB each) do not fit
beside each other in 24 GiB, so the frameworks take turns: diffusers builds the model, is timed,
writes its weights with `save_pretrained` to a temporary folder and is freed; then jdiff loads that
folder, compiles (timed apart) and is timed. The folder is removed at the end.

    python bench/sdxl_unet.py                 # results to bench/results/sdxl_unet.json
    python bench/sdxl_unet.py --repeats 5
"""

import argparse
import gc
import os
import statistics
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
from jdiff.convert import load_unet  # noqa: E402
from jdiff.models.unet import SDXL_BASE  # noqa: E402


def inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(1, 4, 128, 128, generator=gen), timestep=torch.tensor([500.0]),
        context=torch.randn(1, 77, 2048, generator=gen), text_embeds=torch.randn(1, 1280, generator=gen),
        # original size, crop top-left, target size: what the SDXL pipeline passes at 1024x1024.
        time_ids=torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]))


def time_torch(folder: Path, x: dict, repeats: int) -> tuple[np.ndarray, list, float]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**SDXL_BASE).eval()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    print("[torch] warm-up and timed runs...", flush=True)
    with torch.no_grad():
        out = model(x["sample"], x["timestep"], x["context"], added_cond_kwargs=added).sample.numpy()
        times = seconds(lambda: model(x["sample"], x["timestep"], x["context"], added_cond_kwargs=added), repeats)
    print(f"[torch] runs {[round(t, 2) for t in times]} s; saving weights...", flush=True)
    model.save_pretrained(folder)
    return out, times, params_m


def time_torch_and_free(folder: Path, x: dict, repeats: int) -> tuple[np.ndarray, list, float]:
    """time_torch, then a collection: its model is garbage once it returns (10 GB to give back)."""
    result = time_torch(folder, x, repeats)
    gc.collect()
    return result


def time_jdiff(folder: Path, x: dict, repeats: int) -> tuple[np.ndarray, list, float, float]:
    start = time.perf_counter()
    module, params = load_unet(folder)
    load_s = time.perf_counter() - start
    nhwc = lambda t: jnp.asarray(t.numpy().transpose(0, 2, 3, 1))  # noqa: E731
    args = (params, nhwc(x["sample"]), jnp.asarray(x["timestep"].numpy()), jnp.asarray(x["context"].numpy()),
            {"text_embeds": jnp.asarray(x["text_embeds"].numpy()), "time_ids": jnp.asarray(x["time_ids"].numpy())})
    fn = lambda p, s, t, c, a: module.apply({"params": p}, s, t, c, added_cond=a)  # noqa: E731
    print(f"[jdiff] loaded in {load_s:.0f} s; compiling...", flush=True)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    print(f"[jdiff] compiled in {compile_s:.0f} s; warm-up and timed runs...", flush=True)
    out = np.asarray(compiled(*args).block_until_ready())
    times = seconds(lambda: compiled(*args).block_until_ready(), repeats)
    print(f"[jdiff] runs {[round(t, 2) for t in times]} s", flush=True)
    return out, times, compile_s, load_s


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sdxl_unet.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    x = inputs()
    with tempfile.TemporaryDirectory(prefix="jdiff-sdxl-bench-") as tmp:
        ref, torch_times, params_m = time_torch_and_free(Path(tmp), x, args.repeats)
        out, jax_times, compile_s, load_s = time_jdiff(Path(tmp), x, args.repeats)
    ref = ref.transpose(0, 2, 3, 1)
    error = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    torch_s, jdiff_s = statistics.median(torch_times), statistics.median(jax_times)
    result = dict(
        name="unet_sdxl_base_forward_b1_128x128", params_millions=round(params_m, 2), dtype="float32",
        batch=1, latent="128x128x4", context="77x2048", text_embeds=1280, time_ids=6,
        torch_s=torch_s, jdiff_s=jdiff_s, ratio_jdiff_over_torch=jdiff_s / torch_s,
        jdiff_compile_s=compile_s, jdiff_load_s=load_s, max_rel_error=error,
        torch_runs=torch_times, jdiff_runs=jax_times)
    print(f"PyTorch {torch_s:.2f} s, jdiff {jdiff_s:.2f} s (ratio {jdiff_s / torch_s:.2f}), compile "
          f"{compile_s:.0f} s, max rel. error {error:.1e}", flush=True)
    write_report(args.out, [result], statistic="median of the timed runs (after one warm-up call)")


if __name__ == "__main__":
    main()
