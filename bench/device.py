"""One benchmark for the accelerator this host has (GPU, TPU; the CPU otherwise), in bfloat16, with
random weights of the released models' shapes (nothing is downloaded):

- SD1.5-shaped, 512x512, 50 steps, batch 1 and 8;
- SDXL-base-shaped, 1024x1024, 30 steps, batch 1;
- Flux.1-dev-shaped (with T5-XXL), 1024x1024, 4 and 28 steps (one compiled program for both), batch 1.

For each: images/s, the first call's compile time, time to first image in a fresh process (cold:
nothing compiled; warm: the persistent compilation cache filled by the cold process), and peak device
memory; and, where PyTorch sees a CUDA device, the same for diffusers on the same shapes. Each
measurement runs in a child process of its own, so the cold and warm figures are what a new
`sample.py` process sees. One JSON goes to bench/results/, a table to stdout.

    python bench/device.py                       # every model; bench/results/device_<platform>.json
    python bench/device.py --models sd15 --repeats 3
    python bench/device.py --smoke               # tiny shapes on any host (the test suite runs it on CPU)

On a GPU VM: `pip install -e ".[cuda12]" torch diffusers transformers`, then the first command.
On a TPU VM: `pip install -e ".[tpu]"`, then the first command (diffusers is measured only on CUDA).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()  # a child's time to first image counts from here (after the interpreter starts)
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

# --- the models, as data: diffusers/transformers config fields of each component -------------------

CLIP_L = dict(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                     num_attention_heads=20, hidden_act="gelu", architectures=["CLIPTextModelWithProjection"])
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
FOUR_LEVELS = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, **FOUR_LEVELS)
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                timestep_spacing="leading")
FLUX_SHIFT = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096)


def _models():
    from jdiff.models.unet import SDXL_BASE

    return {
        "sd15": dict(
            title="SD1.5-shaped", family="stable-diffusion", size=512, steps=(50,), batches=(1, 8), guidance=7.5,
            components=dict(unet=("unet", dict(sample_size=64, cross_attention_dim=768)),
                            vae=("vae", dict(SD_VAE, scaling_factor=0.18215, force_upcast=False)),
                            text_encoder=("clip_text", CLIP_L)),
            tokenizers=dict(tokenizer=77), scheduler=("EulerDiscreteScheduler", SD_BETAS)),
        "sdxl": dict(
            title="SDXL-base-shaped", family="stable-diffusion-xl", size=1024, steps=(30,), batches=(1,), guidance=5.0,
            components=dict(unet=("unet", SDXL_BASE), vae=("vae", dict(SD_VAE, scaling_factor=0.13025, force_upcast=True)),
                            text_encoder=("clip_text", CLIP_L), text_encoder_2=("clip_text", OPENCLIP_BIGG)),
            tokenizers=dict(tokenizer=77, tokenizer_2=77), scheduler=("EulerDiscreteScheduler", SD_BETAS)),
        "flux": dict(
            title="Flux.1-dev-shaped", family="flux", size=1024, steps=(4, 28), batches=(1,), guidance=3.5,
            components=dict(transformer=("flux_transformer", dict(guidance_embeds=True)),
                            vae=("vae", dict(SD_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                             use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)),
                            text_encoder=("clip_text", CLIP_L), text_encoder_2=("t5_encoder", T5_XXL)),
            tokenizers=dict(tokenizer=77, tokenizer_2=512), scheduler=("FlowMatchEulerDiscreteScheduler", FLUX_SHIFT)),
    }


def _smoke_models():
    """The same three families in miniature (what --smoke and the test suite run)."""
    tiny_vae = dict(block_out_channels=(16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    clip = dict(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2, num_attention_heads=4)
    clip_2 = dict(clip, hidden_size=24, projection_dim=16, hidden_act="gelu", architectures=["CLIPTextModelWithProjection"])
    unet = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=4)
    sdxl_unet = dict(unet, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                     attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32 + 24,
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 16)
    models = _models()
    models["sd15"].update(size=16, steps=(2,), batches=(1, 2), components=dict(
        unet=("unet", dict(unet, cross_attention_dim=32)), vae=("vae", dict(tiny_vae, force_upcast=False)),
        text_encoder=("clip_text", clip)))
    models["sdxl"].update(size=16, steps=(2,), components=dict(
        unet=("unet", sdxl_unet), vae=("vae", dict(tiny_vae, force_upcast=True)),
        text_encoder=("clip_text", clip), text_encoder_2=("clip_text", clip_2)))
    models["flux"].update(size=16, steps=(1, 2), tokenizers=dict(tokenizer=77, tokenizer_2=16), components=dict(
        transformer=("flux_transformer", dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=32,
                                              guidance_embeds=True, axes_dims_rope=(4, 6, 6))),
        vae=("vae", dict(tiny_vae, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)),
        text_encoder=("clip_text", clip), text_encoder_2=("t5_encoder", dict(d_model=24, d_kv=8, d_ff=40, num_layers=2,
                                                                               num_heads=3, feed_forward_proj="gated-gelu"))))
    for spec in models.values():
        spec["title"] += " (smoke: tiny)"
    return models


PROMPT = "a photo of a red circle at the top left"


def _tokenizers(spec: dict, folder: Path) -> dict:
    """Tiny tokenizers in the released formats (the vocabulary size does not change the cost)."""
    from tiny_tokenizers import write_tiny_t5_tokenizer, write_tiny_tokenizer

    from jdiff import convert

    found = {}
    for name, length in spec["tokenizers"].items():
        if spec["components"].get("text_encoder_2", ("",))[0] == "t5_encoder" and name == "tokenizer_2":
            write_tiny_t5_tokenizer(folder / name)
            found[name] = convert.load_t5_tokenizer(folder / name, length)
        else:
            write_tiny_tokenizer(folder / name)
            found[name] = convert.load_tokenizer(folder / name, length)
    return found


# --- jdiff ----------------------------------------------------------------------------------------

def jdiff_pipeline(spec: dict, folder: Path):
    """A jdiff Pipeline of `spec`'s shapes with random bfloat16 weights, made on the device."""
    import jax
    import jax.numpy as jnp

    from jdiff import convert, families
    from jdiff.families.base import Pipeline
    from jdiff.families.stable_diffusion_xl import SETTINGS
    from jdiff.schedules import Scheduler, SchedulerConfig

    tokenizers = _tokenizers(spec, folder)
    modules, params = {}, {}
    for i, (name, (kind, config)) in enumerate(spec["components"].items()):
        config = dict(config)
        if kind == "clip_text":  # the tiny tokenizer's ids, so the pooled output is read where it ends
            tokenizer = tokenizers["tokenizer_2" if name == "text_encoder_2" else "tokenizer"]
            config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        upcast = kind == "vae" and config.get("force_upcast")  # as the SDXL and Flux pipelines run their VAEs
        modules[name], params[name] = convert.random_component(
            kind, config, jax.random.key(i), dtype=jnp.float32 if upcast else jnp.bfloat16, param_dtype=jnp.bfloat16)
    class_name, fields = spec["scheduler"]
    scheduler = Scheduler(SchedulerConfig.from_dict(fields), class_name, frozenset(fields))
    family = families.get(spec["family"])
    settings = dict(SETTINGS) if family.name == "stable-diffusion-xl" else {}
    return Pipeline(family, modules, tokenizers, scheduler, params, "random weights", settings=settings)


def peak_device_bytes():
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
    return stats.get("peak_bytes_in_use")


def _cache_hits():
    """Counts persistent-cache hits in this process (JAX reports each as a monitoring event)."""
    import jax

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    return hits


def jdiff_child(spec: dict, cache: str, warm: bool, repeats: int) -> dict:
    """What one fresh process measures: set-up, the first image, then (cold process only) each
    batch size's compile and steady time."""
    from jdiff.app.batch_generation import enable_compilation_cache

    enable_compilation_cache(cache)
    hits = _cache_hits()
    import jdiff

    with tempfile.TemporaryDirectory() as folder:
        setup_start = time.perf_counter()
        pipe = jdiff_pipeline(spec, Path(folder))
        import jax
        jax.block_until_ready(pipe.params)
        setup = time.perf_counter() - setup_start

        def run(batch: int, steps: int, seed: int) -> float:
            start = time.perf_counter()
            jdiff.generate(pipe, [PROMPT] * batch, steps=steps, guidance=spec["guidance"], seed=seed,
                           height=spec["size"], width=spec["size"])  # returns host arrays: the images are done
            return time.perf_counter() - start

        first_call = run(spec["batches"][0], spec["steps"][0], seed=0)
        result = dict(setup_s=round(setup, 3), first_image_call_s=round(first_call, 3),
                      first_image_from_process_start_s=round(time.perf_counter() - START, 3),
                      cache_hits=len(hits), platform=jax.devices()[0].platform, device=str(jax.devices()[0].device_kind))
        if warm:
            return result
        runs = []
        for batch in spec["batches"]:
            first = first_call if batch == spec["batches"][0] else None
            for steps in spec["steps"]:
                if first is None:
                    first = run(batch, steps, seed=0)
                steady = min(run(batch, steps, seed=1 + r) for r in range(repeats))
                runs.append(dict(batch=batch, steps=steps, first_call_s=round(first, 3), steady_s=round(steady, 3),
                                 images_per_s=round(batch / steady, 4)))
                first = first_call = None  # later step counts reuse the program: no first call
        result.update(runs=runs, compile_s=round(runs[0]["first_call_s"] - runs[0]["steady_s"], 3),
                      peak_device_bytes=peak_device_bytes())
        return result


# --- diffusers (PyTorch), where it can run --------------------------------------------------------

def diffusers_pipeline(spec: dict, folder: Path, device: str):
    import diffusers
    import torch
    import transformers

    _tokenizers(spec, folder)  # the same tokenizer files
    torch.manual_seed(0)
    parts = {}
    with torch.device(device):  # weights made on the device: Flux-sized models never pass through host memory
        for name, (kind, config) in spec["components"].items():
            config = dict(config)
            architectures = config.pop("architectures", None)
            if kind == "unet":
                parts[name] = diffusers.UNet2DConditionModel(**config)
            elif kind == "vae":
                parts[name] = diffusers.AutoencoderKL(**config)
            elif kind == "flux_transformer":
                parts[name] = diffusers.FluxTransformer2DModel(**config)
            elif kind == "t5_encoder":
                parts[name] = transformers.T5EncoderModel(transformers.T5Config(vocab_size=32128, **config))  # jdiff's default
            else:
                tokenizer = transformers.CLIPTokenizer.from_pretrained(
                    folder / ("tokenizer_2" if name == "text_encoder_2" else "tokenizer"))
                text_config = transformers.CLIPTextConfig(bos_token_id=tokenizer.bos_token_id,
                                                          eos_token_id=tokenizer.eos_token_id, **config)
                with_projection = architectures == ["CLIPTextModelWithProjection"]
                parts[name] = (transformers.CLIPTextModelWithProjection if with_projection
                               else transformers.CLIPTextModel)(text_config)
    for name, length in spec["tokenizers"].items():
        t5 = spec["components"].get("text_encoder_2", ("",))[0] == "t5_encoder" and name == "tokenizer_2"
        parts[name] = (transformers.T5TokenizerFast if t5 else transformers.CLIPTokenizer).from_pretrained(
            folder / name, model_max_length=length)
    class_name, fields = spec["scheduler"]
    parts["scheduler"] = getattr(diffusers, class_name)(**fields)
    pipeline_class = {"stable-diffusion": diffusers.StableDiffusionPipeline,
                      "stable-diffusion-xl": diffusers.StableDiffusionXLPipeline, "flux": diffusers.FluxPipeline}
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) \
        if spec["family"] == "stable-diffusion" else {}
    # All of it in bfloat16: diffusers' SDXL pipeline upcasts a force_upcast VAE only from float16,
    # its Flux pipeline never (jdiff decodes such VAEs in float32: a little slower, never overflowing).
    pipe = pipeline_class[spec["family"]](**parts, **extra).to(device, torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_child(spec: dict, device: str, repeats: int) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as folder:
        setup_start = time.perf_counter()
        pipe = diffusers_pipeline(spec, Path(folder), device)
        setup = time.perf_counter() - setup_start
        options = dict(max_sequence_length=spec["tokenizers"]["tokenizer_2"]) if spec["family"] == "flux" else {}

        def run(batch: int, steps: int, seed: int) -> float:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=spec["guidance"],
                 height=spec["size"], width=spec["size"], output_type="np",
                 generator=torch.Generator(device).manual_seed(seed), **options)
            return time.perf_counter() - start

        first_call = run(spec["batches"][0], spec["steps"][0], seed=0)
        result = dict(setup_s=round(setup, 3), first_image_call_s=round(first_call, 3),
                      first_image_from_process_start_s=round(time.perf_counter() - START, 3), device=device)
        runs = []
        for batch in spec["batches"]:
            for steps in spec["steps"]:
                steady = min(run(batch, steps, seed=1 + r) for r in range(repeats))
                runs.append(dict(batch=batch, steps=steps, steady_s=round(steady, 3), images_per_s=round(batch / steady, 4)))
        result.update(runs=runs, peak_device_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None)
        return result


def diffusers_device(smoke: bool) -> str | None:
    """"cuda" where PyTorch sees a GPU; with --smoke also "cpu" (so the reference side never rots)."""
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else "cpu" if smoke else None


# --- the parent: one child process per measurement -------------------------------------------------

def child(args) -> dict:
    specs = _smoke_models() if args.smoke else _models()
    if args.side == "diffusers":
        return diffusers_child(specs[args.model], args.device, args.repeats)
    return jdiff_child(specs[args.model], args.cache, args.side == "jdiff-warm", args.repeats)


def measure(model: str, side: str, args, cache: str, device: str = "") -> dict:
    command = [sys.executable, __file__, "--child", "--model", model, "--side", side, "--cache", cache,
               "--repeats", str(args.repeats), "--device", device] + (["--smoke"] if args.smoke else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        out_of_memory = "RESOURCE_EXHAUSTED" in done.stderr or "OutOfMemoryError" in done.stderr
        print(f"{model} / {side} failed{' (out of device memory)' if out_of_memory else ''}:\n{tail}", file=sys.stderr)
        return {"error": "out of device memory" if out_of_memory else tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = ["model            side        batch steps  images/s  compile s  first image cold/warm s  peak GiB"]
    for model, sides in results.items():
        cold, warm = sides.get("jdiff", {}), sides.get("jdiff_warm", {})
        for side in ("jdiff", "diffusers"):
            result = sides.get(side)
            if not result:
                continue
            if "error" in result:
                lines.append(f"{model:16} {side:10}  {result['error'].splitlines()[-1][:60]}")
                continue
            first = (f"{cold.get('first_image_from_process_start_s', float('nan')):.1f} / "
                     f"{warm.get('first_image_from_process_start_s', float('nan')):.1f}" if side == "jdiff"
                     else f"{result['first_image_from_process_start_s']:.1f}")
            peak = f"{result['peak_device_bytes'] / 2**30:.2f}" if result.get("peak_device_bytes") else "-"
            compile_s = f"{result['compile_s']:.1f}" if side == "jdiff" else "-"
            for run in result["runs"]:
                lines.append(f"{model:16} {side:10} {run['batch']:5} {run['steps']:5} {run['images_per_s']:9.3f} "
                             f"{compile_s:>10}  {first:>23}  {peak:>8}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl", "flux"], choices=["sd15", "sdxl", "flux"])
    parser.add_argument("--repeats", type=int, default=2, help="steady-state calls per setting (the best is kept)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on any host")
    parser.add_argument("--out", help="the JSON (default bench/results/device_<platform>.json; --smoke: not written)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    specs = _smoke_models() if args.smoke else _models()
    torch_device = diffusers_device(args.smoke)
    results = {}
    with tempfile.TemporaryDirectory() as caches:
        for model in args.models:
            cache = str(Path(caches) / model)  # empty: the first process compiles everything
            sides = {"jdiff": measure(model, "jdiff", args, cache)}
            sides["jdiff_warm"] = measure(model, "jdiff-warm", args, cache)
            if torch_device:
                sides["diffusers"] = measure(model, "diffusers", args, cache, torch_device)
            results[model] = dict(title=specs[model]["title"], size=specs[model]["size"], **sides)
            print(f"{model}: done", file=sys.stderr)
    print(table(results))
    platform = next((s["platform"] for r in results.values() for s in (r["jdiff"],) if "platform" in s), "unknown")
    out = args.out or (None if args.smoke else ROOT / "bench" / "results" / f"device_{platform}.json")
    if out:
        from report import write_report

        write_report(out, [dict(model=m, **r) for m, r in results.items()], dtype="bfloat16",
                     diffusers_device=torch_device)


if __name__ == "__main__":
    main()
