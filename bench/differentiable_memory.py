"""Compiled memory of a gradient through the whole sampling loop, as the step count grows: with
per-step rematerialisation, without it, and DRaFT-1 (the last step only), from XLA's memory
analysis of the compiled program (nothing is allocated; the weights are shapes only).

The gradient is of a scalar of the final latents with respect to every U-Net weight, through
DPM-Solver++ 2M with classifier-free guidance (a doubled batch), as reward fine-tuning takes it.
Models: the default run's U-Net (jdiff/configs/default.py, 16x16 latents, batch 8) and an
SD1.5-shaped U-Net (64x64 latents for 512x512 images, batch 1).

No reference runs beside it: diffusers' pipelines sample under torch.no_grad, and no JAX peer
differentiates its sampler (issue 22), so there is no peer figure to divide by.

    python bench/differentiable_memory.py     # results to bench/results/differentiable_memory.json
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdiff import guidance, samplers  # noqa: E402
from jdiff.configs import default  # noqa: E402
from jdiff.models.unet import UNet2DConditionModel, UNetConfig, example_inputs  # noqa: E402
from jdiff.schedules import SchedulerConfig  # noqa: E402
from report import write_report  # noqa: E402

SHAPES_UNET = dict(default.get_config().unet, in_channels=4, out_channels=4, cross_attention_dim=128, sample_size=16)
MODELS = {
    "shapes_default": dict(fields=SHAPES_UNET, latent=16, batch=8, tokens=32, steps=(5, 10, 25, 50)),
    "sd15": dict(fields=dict(sample_size=64, cross_attention_dim=768), latent=64, batch=1, tokens=77, steps=(10, 50)),
}
MODES = {"remat": dict(remat=True, grad_steps=None), "no_remat": dict(remat=False, grad_steps=None),
         "draft_1": dict(remat=True, grad_steps=1)}


def temp_bytes(unet, params, model, steps, mode) -> tuple[int, float]:
    config = unet.config
    batch, side = model["batch"], model["latent"]
    cross = config.per_block("cross_attention_dim")[0]
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    plan = samplers.make_plan("dpm++2m", SchedulerConfig(), steps)

    def loss(params, noise, cond, negative):
        def model_fn(values, x, t, step):
            call = lambda x, t, c, extra: unet.apply({"params": values}, x, jnp.broadcast_to(t, x.shape[:1]),
                                                     c["context"])
            return guidance.classifier_free_guidance(call, cond, negative, 4.0)(x, t)

        latents = samplers.sample_differentiable(model_fn, params, noise, plan, max_steps=steps, **mode)
        return jnp.mean(latents ** 2)

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss)).lower(
        params, shape(batch, side, side, config.in_channels), {"context": shape(batch, model["tokens"], cross)},
        {"context": shape(batch, model["tokens"], cross)}).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def main():
    results = []
    for name, model in MODELS.items():
        unet = UNet2DConditionModel(UNetConfig.from_dict(model["fields"]))
        inputs = example_inputs(unet.config)
        params = jax.eval_shape(lambda: unet.init(jax.random.key(0), *inputs)["params"])
        for mode_name, mode in MODES.items():
            for steps in model["steps"]:
                memory, seconds = temp_bytes(unet, params, model, steps, mode)
                row = dict(model=name, mode=mode_name, steps=steps, batch=model["batch"], latent=model["latent"],
                           temp_mib=round(memory / 2**20, 1), compile_seconds=round(seconds, 1))
                print(row, flush=True)
                results.append(row)
    write_report(Path(__file__).parent / "results" / "differentiable_memory.json", results,
                 note="XLA temp bytes of jax.grad through the sampling loop (float32, DPM-Solver++ 2M, guidance 4); "
                      "weights and their gradient are arguments/outputs, not counted in temp")


if __name__ == "__main__":
    main()
