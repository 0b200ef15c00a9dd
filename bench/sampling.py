"""jdiff.generate vs diffusers' StableDiffusionPipeline on this machine, float32, same random weights.

For each model and batch size it reports, for both sides:
- time per sampling step, from two runs that differ only in step count (jdiff reuses one compiled
  program for both), against one U-Net forward on the guidance-doubled batch: the loop's overhead;
- time to first image (jdiff: including compilation, reported separately) and images/s.

    python bench/sampling.py                      # small model at batch 1 and 8, SD1.5 shape at batch 1
    python bench/sampling.py --only small --repeats 2
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
from report import write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import jdiff  # noqa: E402
from jdiff import sharding  # noqa: E402
from tiny_models import write_tiny_tokenizer  # noqa: E402

MODELS = {
    # A 12.8M-parameter U-Net (blocks 64/128/256) on 32x32x4 latents: the embedded-data model size.
    "small": dict(
        unet=dict(sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=1, cross_attention_dim=256,
                  attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2),
        vae=dict(block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=32),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        steps=(10, 20),
    ),
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768),
        vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        steps=(2, 4),
    ),
}


def build(folder: Path, spec: dict):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = write_tiny_tokenizer(folder / "_tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        **spec["text"]))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**spec["vae"]), text_encoder=text, tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**spec["unet"]), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def loop_overhead(pipe, x, context, steps: int, repeats: int) -> dict:
    """The sampling loop alone (DDIM, guidance 7.5) against the same number of separately
    dispatched guided U-Net calls: what the fori_loop, the schedule lookups and the update cost."""
    from jdiff import guidance, samplers

    plan = jax.tree.map(jnp.asarray, samplers.make_plan("ddim", pipe.scheduler.config, steps, explicit=pipe.scheduler.explicit))

    def denoise_fn(params, x, t):
        unet = lambda x, t, c: pipe.unet.apply({"params": params}, x, t, c)
        half = context[: x.shape[0]]
        return guidance.classifier_free_guidance(unet, half, half * 0.5, 7.5)(x, t)

    loop = jax.jit(lambda p, x, plan: samplers.sample(lambda x, t: denoise_fn(p, x, t), x, plan))
    call = jax.jit(denoise_fn)
    params = pipe.params["unet"]
    loop(params, x, plan).block_until_ready()
    call(params, x, 500.0).block_until_ready()

    def calls():
        for t in np.asarray(plan.timesteps[:steps]):
            call(params, x, t).block_until_ready()

    loop_s = best_time(lambda: loop(params, x, plan).block_until_ready(), repeats)
    calls_s = best_time(calls, repeats)
    return dict(steps=steps, loop_s=loop_s, calls_s=calls_s, overhead=loop_s / calls_s - 1)


def bench(name: str, spec: dict, batch: int, repeats: int, folder: Path) -> dict:
    reference = build(folder, spec) if not (folder / "model_index.json").exists() else None
    if reference is None:
        from diffusers import StableDiffusionPipeline

        reference = StableDiffusionPipeline.from_pretrained(folder)
        reference.set_progress_bar_config(disable=True)
    pipe = jdiff.load_pipeline(folder)
    mesh = sharding.make_mesh({"data": -1})
    prompts = ["a red circle at the top left"] * batch
    size = pipe.default_size
    s1, s2 = spec["steps"]
    print(f"[{name} b{batch}] {size}x{size}, steps {s1} and {s2}", flush=True)

    # PyTorch reference.
    run_torch = lambda steps: reference(prompts, num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    with torch.no_grad():
        start = time.perf_counter()
        run_torch(s1)
        torch_first = time.perf_counter() - start
        torch_t1, torch_t2 = best_time(lambda: run_torch(s1), repeats), best_time(lambda: run_torch(s2), repeats)
        latent = size // pipe.vae_scale_factor
        x = torch.randn(2 * batch, 4, latent, latent)
        ctx = torch.randn(2 * batch, 77, reference.text_encoder.config.hidden_size)
        torch_unet = best_time(lambda: reference.unet(x, torch.tensor(500.0), ctx), repeats)

    # jdiff: the first call compiles; later calls with another step count reuse the program.
    run_jax = lambda steps: jdiff.generate(pipe, prompts, steps=steps, guidance=7.5, mesh=mesh)
    before = compile_total[0]
    start = time.perf_counter()
    run_jax(s1)
    jax_first = time.perf_counter() - start
    compile_s = compile_total[0] - before
    jax_t1, jax_t2 = best_time(lambda: run_jax(s1), repeats), best_time(lambda: run_jax(s2), repeats)
    unet_fn = jax.jit(lambda p, x, c: pipe.unet.apply({"params": p}, x, 500.0, c))
    xj, cj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(ctx.numpy())
    unet_fn(pipe.params["unet"], xj, cj).block_until_ready()
    jax_unet = best_time(lambda: unet_fn(pipe.params["unet"], xj, cj).block_until_ready(), repeats)
    loop = loop_overhead(pipe, xj[:batch], cj, s2, repeats)

    def side(t1, t2, unet, first):
        per_step = (t2 - t1) / (s2 - s1)
        return dict(per_step_s=per_step, unet_forward_s=unet, loop_overhead=per_step / unet - 1,
                    time_to_first_image_s=first, images_per_s=batch / t2, seconds_at_steps={s1: t1, s2: t2})

    result = dict(model=name, batch=batch, image=f"{size}x{size}", steps=[s1, s2], guidance=7.5,
                  torch=side(torch_t1, torch_t2, torch_unet, torch_first),
                  jdiff=dict(side(jax_t1, jax_t2, jax_unet, jax_first), compile_s=compile_s, isolated_loop=loop))
    result["images_per_s_ratio_jdiff_over_torch"] = result["jdiff"]["images_per_s"] / result["torch"]["images_per_s"]
    for who in ("torch", "jdiff"):
        r = result[who]
        print(f"  {who:6s} step {r['per_step_s']:.3f} s vs U-Net {r['unet_forward_s']:.3f} s "
              f"(overhead {100 * r['loop_overhead']:+.1f}%), first image {r['time_to_first_image_s']:.1f} s, "
              f"{r['images_per_s']:.3f} images/s at {s2} steps", flush=True)
    print(f"  jdiff isolated loop: {loop['steps']} steps {loop['loop_s']:.3f} s vs {loop['steps']} guided U-Net calls "
          f"{loop['calls_s']:.3f} s (overhead {100 * loop['overhead']:+.2f}%)", flush=True)
    print(f"  jdiff compile {compile_s:.1f} s; images/s ratio jdiff/torch "
          f"{result['images_per_s_ratio_jdiff_over_torch']:.2f}", flush=True)
    return result


compile_total = [0.0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compile_total.__setitem__(0, compile_total[0] + duration)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(MODELS), default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    runs = [("small", 1), ("small", 8), ("sd15", 1)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, batch in runs:
            if args.only in (None, name):
                results.append(bench(name, MODELS[name], batch, args.repeats, Path(tmp) / name))
    write_report(args.out, results, sampler="ddim")


if __name__ == "__main__":
    main()
