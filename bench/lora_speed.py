"""What LoRA costs at generation: jdiff unmerged (one adapter, and two adapters mixed per image)
and fused, against the base model, beside diffusers with the same LoRA (PEFT layers, set_adapters)
and fused; float32, same random weights, DDIM with guidance, in one process.

The model is bench/sampling.py's small one (12.8M-parameter U-Net, 256x256 images); the LoRA is
rank 16 on every attention projection of the U-Net and the text encoder, with random weights.

    python bench/lora_speed.py            # results to bench/results/lora_speed.json
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
import jdiff  # noqa: E402
from report import write_report  # noqa: E402
from sampling import MODELS, best_time, build  # noqa: E402
from tiny_models import write_random_lora  # noqa: E402

TARGETS = dict(unet_targets=("to_q", "to_k", "to_v", "to_out.0"), text_targets=("q_proj", "k_proj", "v_proj", "out_proj"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    prompts = [f"a red circle number {i}" for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "small"
        reference = build(folder, MODELS["small"])
        loras = [write_random_lora(folder, Path(tmp) / f"lora{i}", seed=i, rank=16, alpha=16, scale=0.05, **TARGETS)
                 for i in range(2)]
        kw = dict(steps=args.steps, guidance=7.5, sampler="ddim", seed=0)
        base = jdiff.load_pipeline(folder)
        one = jdiff.load_lora_weights(base, loras[0], adapter_name="a")
        two = jdiff.load_lora_weights(one, loras[1], adapter_name="b")
        mixes = [{"a": 1.0} if i % 2 else {"b": 0.7, "a": 0.3} for i in range(args.batch)]
        cases = {
            "jdiff base": lambda: jdiff.generate(base, prompts, **kw),
            "jdiff 1 LoRA unmerged": lambda: jdiff.generate(one, prompts, **kw),
            "jdiff 2 LoRAs mixed per image": lambda: jdiff.generate(two, prompts, lora_scales=mixes, **kw),
            "jdiff 1 LoRA fused": (lambda fused: lambda: jdiff.generate(fused, prompts, **kw))(jdiff.fuse_lora(one)),
        }
        results = {}
        for name, fn in cases.items():
            fn()  # compile
            results[name] = best_time(fn, args.repeats)
            print(f"{name}: {results[name]:.2f} s", flush=True)

        def torch_run():
            with torch.no_grad():
                return reference(prompts, num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
                                 generator=torch.Generator().manual_seed(0)).images

        results["diffusers base"] = best_time(torch_run, args.repeats)
        reference.load_lora_weights(str(loras[0]), adapter_name="a")
        reference.set_adapters(["a"], [1.0])
        results["diffusers 1 LoRA unmerged"] = best_time(torch_run, args.repeats)
        reference.fuse_lora(adapter_names=["a"])
        reference.unload_lora_weights()
        results["diffusers 1 LoRA fused"] = best_time(torch_run, args.repeats)
        for name in results:
            if name.startswith("diffusers"):
                print(f"{name}: {results[name]:.2f} s", flush=True)
    rows = [dict(case=name, seconds=round(seconds, 3),
                 vs_own_base=round(seconds / results[("jdiff" if name.startswith("jdiff") else "diffusers") + " base"], 3))
            for name, seconds in results.items()]
    write_report(ROOT / "bench" / "results" / "lora_speed.json", rows, batch=args.batch, steps=args.steps,
                 image="256x256", lora="rank 16 on U-Net and text-encoder attention projections",
                 jdiff_over_diffusers_unmerged=round(results["jdiff 1 LoRA unmerged"] / results["diffusers 1 LoRA unmerged"], 3))


if __name__ == "__main__":
    main()
