"""What a U-Net train step (SD1.5's and SDXL base's) costs per device on different meshes, from the
compiled program alone (nothing is run): per-device memory from XLA's memory analysis, and every
collective operation in the partitioned HLO with its bytes.

The step is jdiff's own (`train_lib.train_step`: AdamW, gradient clipping, EMA) on the train state
laid out by `jdiff.sharding`, with the text encoders' outputs as inputs (frozen text encoders:
context, and for SDXL the pooled text and the 6 micro-conditioning ids) and latents as inputs
(frozen VAE, latents precomputed): what a cluster run spends on the U-Net.

    python bench/scale.py                              # both models, results to bench/results/scale.json
    python bench/scale.py --models sdxl --merge        # SDXL rows only, keeping the file's SD1.5 rows
    python bench/scale.py --per-device-batch 4 --meshes data=8 fsdp=8
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdiff import losses, sharding, train_lib  # noqa: E402
from jdiff.families import stable_diffusion, stable_diffusion_xl  # noqa: E402
from jdiff.models import attention  # noqa: E402
from jdiff.models.unet import SDXL_BASE, UNet2DConditionModel, UNetConfig  # noqa: E402
from jdiff.schedules import SchedulerConfig, train_alphas_cumprod  # noqa: E402
from report import command_line, write_report  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
_OP = re.compile(r"= (\(.*?\)|\S+) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def shape_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for t, dims in _SHAPE.findall(text))


def group_size(line: str, devices: int) -> int:
    """Participants per group, from replica_groups={{0,1},{2,3}} or the iota form [2,4]<=[8]."""
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line):
        return int(m.group(2))
    if m := re.search(r"replica_groups=\{\{([\d,]+)\}", line):
        return len(m.group(1).split(","))
    return devices


def wire_bytes(op: str, result_bytes: int, n: int) -> float:
    """Bytes each device sends with ring algorithms (the usual bandwidth-optimal choice)."""
    if n <= 1:
        return 0.0
    if op == "all-reduce":
        return 2 * (n - 1) / n * result_bytes
    if op == "all-gather":
        return (n - 1) / n * result_bytes
    if op == "reduce-scatter":
        return (n - 1) * result_bytes  # the operand is n times the result
    return float(result_bytes)  # all-to-all, collective-permute: about the whole buffer


def collectives(hlo: str, devices: int) -> dict:
    found = defaultdict(lambda: {"count": 0, "result_bytes": 0, "wire_bytes_per_device": 0.0})
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        op, size = m.group(2), shape_bytes(m.group(1))
        entry = found[op]
        entry["count"] += 1
        entry["result_bytes"] += size
        entry["wire_bytes_per_device"] += wire_bytes(op, size, group_size(line, devices))
    return dict(found)


# The models, as data: U-Net config fields, latent side, context [L, D], and SDXL's added
# conditioning widths (pooled text, time ids). Per-device batch: SD1.5 at 512 px, SDXL at 1024 px.
MODELS = {
    "sd15": dict(title="SD1.5 U-Net (859.5M parameters)", unet=dict(sample_size=64, cross_attention_dim=768),
                 latent=64, context=(77, 768), added=None, per_device_batch=8, family=stable_diffusion.FAMILY),
    "sdxl": dict(title="SDXL-base U-Net (2567.5M parameters)", unet=SDXL_BASE, latent=128, context=(77, 2048),
                 added=dict(text_embeds=1280, time_ids=6), per_device_batch=2, family=stable_diffusion_xl.FAMILY),
}


def unet_train_step(spec: dict, mesh, per_device_batch: int):
    """The compiled U-Net train step on `mesh` and its train-state bytes."""
    config = UNetConfig.from_dict(spec["unet"])
    unet = UNet2DConditionModel(config)
    alphas_cumprod = jnp.asarray(train_alphas_cumprod(SchedulerConfig(beta_schedule="scaled_linear",
                                                                      beta_start=0.00085, beta_end=0.012)))
    side, (length, width), added = spec["latent"], spec["context"], spec["added"]

    def init_params(rng):
        example = {k: jnp.zeros((1, w)) for k, w in added.items()} if added else None
        return unet.init(rng, jnp.zeros((1, side, side, 4)), jnp.zeros((1,)), jnp.zeros((1, length, width)),
                         added_cond=example)["params"]

    def loss_fn(params, frozen, batch, rng):
        t_rng, n_rng = jax.random.split(rng)
        x0 = batch["latents"]
        t = jax.random.randint(t_rng, (x0.shape[0],), 0, 1000)
        noise = jax.random.normal(n_rng, x0.shape)
        # The family's own denoiser call: the conditioning is the batch's context (and SDXL's added inputs).
        model_fn = spec["family"].denoiser({"unet": unet}, {"unet": params})
        cond = {k: batch[k] for k in ("context",) + tuple(added or ())}
        out = model_fn(losses.add_noise(x0, noise, t, alphas_cumprod), t, cond)
        return losses.diffusion_loss(out, x0, noise, t, alphas_cumprod, prediction_type="epsilon")[0], {}

    stage = train_lib.Stage("diffusion", init_params, loss_fn, lambda b: b)
    section = dict(steps=1000, warmup_steps=10, learning_rate=1e-4, final_lr_fraction=0.1, grad_clip=1.0,
                   adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=1e-2, grad_accum_steps=1)

    class Section(dict):
        __getattr__ = dict.__getitem__

    optimizer = train_lib.make_optimizer(Section(section))
    create = functools.partial(train_lib.init_state, stage=stage, optimizer=optimizer)
    abstract = jax.eval_shape(create, jax.random.key(0))
    state_shardings = sharding.tree_shardings(abstract, mesh)
    batch_size = per_device_batch * mesh.size // mesh.shape["tensor"]
    batch = {"latents": jax.ShapeDtypeStruct((batch_size, side, side, 4), jnp.float32),
             "context": jax.ShapeDtypeStruct((batch_size, length, width), jnp.float32),
             **{k: jax.ShapeDtypeStruct((batch_size, w), jnp.float32) for k, w in (added or {}).items()}}
    step = jax.jit(functools.partial(train_lib.train_step, loss_fn=loss_fn, optimizer=optimizer, ema_decay=0.9999),
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh), None),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(sharding.with_shardings(abstract, state_shardings), batch, None).compile()
    state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    per_device_state = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                           for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(state_shardings)))
    return compiled, time.perf_counter() - start, batch_size, state_bytes, per_device_state


def bench(model: str, mesh_spec: dict, per_device_batch: int) -> dict:
    spec = MODELS[model]
    mesh = sharding.make_mesh(mesh_spec)
    name = " x ".join(f"{k}={v}" for k, v in mesh_spec.items())
    print(f"[{model} {name}] compiling the {spec['title']} train step...", flush=True)
    compiled, compile_s, batch, state_bytes, state_per_device = unet_train_step(spec, mesh, per_device_batch)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gib = lambda n: round(n / 2**30, 3)  # noqa: E731
    found = collectives(compiled.as_text(), mesh.size)
    side, (length, width) = spec["latent"], spec["context"]
    result = dict(
        model=model, mesh=name, devices=mesh.size, per_device_batch=per_device_batch, global_batch=batch,
        latent=f"{side}x{side}x4", context=f"{length}x{width}",
        **({"added_cond": spec["added"]} if spec["added"] else {}),
        train_state_gib=gib(state_bytes), train_state_per_device_gib=gib(state_per_device),
        per_device_memory_gib=dict(arguments=gib(memory.argument_size_in_bytes),
                                   outputs=gib(memory.output_size_in_bytes), aliased=gib(memory.alias_size_in_bytes),
                                   temporaries=gib(memory.temp_size_in_bytes),
                                   peak_estimate=gib(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                                     - memory.alias_size_in_bytes + memory.temp_size_in_bytes)),
        flops_per_device=float(cost.get("flops", 0.0)),
        collectives={op: dict(v, result_gib=gib(v["result_bytes"]), wire_gib_per_device=gib(v["wire_bytes_per_device"]))
                     for op, v in found.items()},
        wire_gib_per_device_total=gib(sum(v["wire_bytes_per_device"] for v in found.values())),
        compile_s=round(compile_s, 1))
    print(f"[{model} {name}] state/device {result['train_state_per_device_gib']} GiB, peak/device "
          f"{result['per_device_memory_gib']['peak_estimate']} GiB, collectives "
          + ", ".join(f"{op} x{v['count']} {v['wire_gib_per_device']} GiB" for op, v in result["collectives"].items())
          + f", compiled in {compile_s:.0f} s", flush=True)
    return result


def parse_mesh(text: str) -> dict:
    return {k: int(v) for k, v in (part.split("=") for part in text.split(","))}


def kept_rows(out: str, models: list) -> list:
    """The rows of other models in an earlier report, each with the command that made it."""
    if not Path(out).exists():
        return []
    earlier = json.loads(Path(out).read_text())
    return [dict(row, model=row.get("model", "sd15"), command=row.get("command", earlier["command"]),
                 per_device_batch=row.get("per_device_batch", earlier.get("per_device_batch")))
            for row in earlier["results"] if row.get("model", "sd15") not in models]


def main():
    attention.FORCE = "xla"  # compile plain XLA attention, batch-shardable (a TPU/GPU kernel cannot compile here)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS, reverse=True))
    parser.add_argument("--meshes", nargs="+", default=["data=8", "fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2"])
    parser.add_argument("--per-device-batch", type=int, default=None,
                        help="for every model (default: each model's own, see MODELS)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the models not run from the existing --out file")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = parser.parse_args()
    earlier = kept_rows(args.out, args.models) if args.merge else []
    results = [dict(bench(model, parse_mesh(m), args.per_device_batch or MODELS[model]["per_device_batch"]),
                    **({"command": command_line()} if earlier else {}))
               for model in args.models for m in args.meshes]
    write_report(args.out, earlier + results, models={k: v["title"] for k, v in MODELS.items()},
                 step="AdamW + clipping + EMA, float32, no gradient checkpointing",
                 **({"note": "rows carry the command that made them (--merge)"} if earlier else {}))


if __name__ == "__main__":
    main()
