"""What one denoiser call of a full-size diffusion transformer (Flux.1-dev, SD3.5 Large) costs per
device when its weights are split over a mesh, from the compiled program alone (nothing is run, no
weights exist): per-device parameter bytes from jdiff's sharding rules, XLA's memory analysis
(arguments, temporaries, peak) and the collectives of the partitioned program.

The call is the family's own denoiser (`Family.denoiser`: Flux packs the latents and embeds the
guidance scale; SD3 takes its 77 + 256 text tokens) in bfloat16 on 8 fake CPU devices, at
1024x1024, with a per-device batch of 1 (SD3.5: 2, the two halves of classifier-free guidance).
Attention is XLA's (the partitionable path an accelerator compiler sees; `attention.FORCE`).

    python bench/dit_scale.py                       # both models, results to bench/results/dit_scale.json
    python bench/dit_scale.py --models flux-dev --meshes fsdp=8
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdiff import sharding  # noqa: E402
from jdiff.families import flux, stable_diffusion_3  # noqa: E402
from jdiff.models import attention, flux_transformer, sd3_transformer  # noqa: E402
from report import write_report  # noqa: E402
from scale import collectives  # noqa: E402

# The released transformer/config.json files' architectural fields, as data.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")

MODELS = {
    "flux-dev": dict(family=flux.FAMILY, build=lambda: flux_transformer.FluxTransformer2DModel(
        flux_transformer.FluxTransformerConfig(**FLUX_DEV), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
        example=flux_transformer.example_inputs, latent=(128, 128, 16), context=(512, 4096), pooled=768,
        per_device_batch=1),
    "sd3.5-large": dict(family=stable_diffusion_3.FAMILY, build=lambda: sd3_transformer.SD3Transformer2DModel(
        sd3_transformer.SD3TransformerConfig(**SD35_LARGE), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
        example=sd3_transformer.example_inputs, latent=(128, 128, 16), context=(77 + 256, 4096), pooled=2048,
        per_device_batch=2),
}


def bench(name: str, mesh_spec: dict) -> dict:
    spec = MODELS[name]
    mesh = sharding.make_mesh(mesh_spec)
    mesh_name = " x ".join(f"{k}={v}" for k, v in mesh_spec.items())
    module = spec["build"]()
    inputs = spec["example"](module.config)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
    shardings = sharding.tree_shardings(abstract, mesh)
    batch = spec["per_device_batch"] * sharding.batch_shards(mesh)
    h, w, c = spec["latent"]
    length, width = spec["context"]
    args = (jax.ShapeDtypeStruct((batch, h, w, c), jnp.bfloat16), jax.ShapeDtypeStruct((batch, length, width),
                                                                                       jnp.bfloat16),
            jax.ShapeDtypeStruct((batch, spec["pooled"]), jnp.bfloat16))

    def denoise(params, x, context, pooled):
        model_fn = spec["family"].denoiser({"transformer": module}, {"transformer": params}, jnp.float32(3.5))
        return model_fn(x, jnp.float32(500.0), {"context": context, "pooled": pooled})

    batched = sharding.batch_sharding(mesh)
    step = jax.jit(denoise, in_shardings=(shardings, batched, batched, batched), out_shardings=batched)
    print(f"[{name} {mesh_name}] compiling one denoiser call...", flush=True)
    start = time.perf_counter()
    compiled = step.lower(sharding.with_shardings(abstract, shardings), *args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    gib = lambda n: round(n / 2**30, 3)  # noqa: E731
    params_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    per_device = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                     for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
    found = collectives(compiled.as_text(), mesh.size)
    result = dict(
        model=name, mesh=mesh_name, devices=mesh.size, per_device_batch=spec["per_device_batch"], global_batch=batch,
        parameters_m=round(sum(a.size for a in jax.tree.leaves(abstract)) / 1e6, 1),
        params_gib=gib(params_bytes), params_per_device_gib=gib(per_device),
        per_device_memory_gib=dict(arguments=gib(memory.argument_size_in_bytes),
                                   outputs=gib(memory.output_size_in_bytes),
                                   temporaries=gib(memory.temp_size_in_bytes),
                                   peak_estimate=gib(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                                     - memory.alias_size_in_bytes + memory.temp_size_in_bytes)),
        collectives={op: dict(count=v["count"], wire_gib_per_device=gib(v["wire_bytes_per_device"]))
                     for op, v in found.items()},
        compile_s=round(compile_s, 1))
    print(f"[{name} {mesh_name}] {result['parameters_m']}M parameters, {result['params_per_device_gib']} GiB per "
          f"device, peak {result['per_device_memory_gib']['peak_estimate']} GiB, compiled in {compile_s:.0f} s",
          flush=True)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--meshes", nargs="+", default=["fsdp=8", "fsdp=4,tensor=2"],
                   help="comma-separated axis=size lists, e.g. fsdp=4,tensor=2")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "dit_scale.json"))
    args = p.parse_args(argv)
    attention.FORCE = "xla"
    meshes = [{k: int(v) for k, v in (part.split("=") for part in spec.split(","))} for spec in args.meshes]
    results = [bench(model, mesh) for model in args.models for mesh in meshes]
    write_report(args.out, results, note="compiled only: per-device figures of XLA:CPU's memory analysis for a "
                                         "program partitioned over 8 fake devices; nothing was run")


if __name__ == "__main__":
    main()
