"""What an SD1.5 U-Net train step costs per device on different meshes, from the compiled program
alone (nothing is run): per-device memory from XLA's memory analysis, and every collective
operation in the partitioned HLO with its bytes.

The step is jdiff's own (`train_lib.train_step`: AdamW, gradient clipping, EMA) on the train state
laid out by `jdiff.sharding`, with the text encoder's output as an input (frozen text encoder) and
latents as inputs (frozen VAE, latents precomputed): what a cluster run spends on the U-Net.

    python bench/scale.py                              # results to bench/results/scale.json
    python bench/scale.py --per-device-batch 4 --meshes data=8 fsdp=8
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import functools  # noqa: E402
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
from jdiff.models import layers  # noqa: E402
from jdiff.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from jdiff.schedules import SchedulerConfig, train_alphas_cumprod  # noqa: E402
from report import write_report  # noqa: E402

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


def sd15_train_step(mesh, per_device_batch: int):
    """The compiled SD1.5 U-Net train step on `mesh` and its train-state bytes."""
    config = UNetConfig(sample_size=64, cross_attention_dim=768)
    unet = UNet2DConditionModel(config)
    alphas_cumprod = jnp.asarray(train_alphas_cumprod(SchedulerConfig(beta_schedule="scaled_linear",
                                                                      beta_start=0.00085, beta_end=0.012)))

    def init_params(rng):
        return unet.init(rng, jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 768)))["params"]

    def loss_fn(params, frozen, batch, rng):
        t_rng, n_rng = jax.random.split(rng)
        x0 = batch["latents"]
        t = jax.random.randint(t_rng, (x0.shape[0],), 0, 1000)
        noise = jax.random.normal(n_rng, x0.shape)
        out = unet.apply({"params": params}, losses.add_noise(x0, noise, t, alphas_cumprod), t, batch["context"])
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
    batch = {"latents": jax.ShapeDtypeStruct((batch_size, 64, 64, 4), jnp.float32),
             "context": jax.ShapeDtypeStruct((batch_size, 77, 768), jnp.float32)}
    step = jax.jit(functools.partial(train_lib.train_step, loss_fn=loss_fn, optimizer=optimizer, ema_decay=0.9999),
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh), None),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(sharding.with_shardings(abstract, state_shardings), batch, None).compile()
    state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    per_device_state = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                           for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(state_shardings)))
    return compiled, time.perf_counter() - start, batch_size, state_bytes, per_device_state


def bench(mesh_spec: dict, per_device_batch: int) -> dict:
    mesh = sharding.make_mesh(mesh_spec)
    name = " x ".join(f"{k}={v}" for k, v in mesh_spec.items())
    print(f"[{name}] compiling the SD1.5 U-Net train step...", flush=True)
    compiled, compile_s, batch, state_bytes, state_per_device = sd15_train_step(mesh, per_device_batch)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gib = lambda n: round(n / 2**30, 3)  # noqa: E731
    found = collectives(compiled.as_text(), mesh.size)
    result = dict(
        mesh=name, devices=mesh.size, global_batch=batch, latent="64x64x4", context="77x768",
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
    print(f"[{name}] state/device {result['train_state_per_device_gib']} GiB, peak/device "
          f"{result['per_device_memory_gib']['peak_estimate']} GiB, collectives "
          + ", ".join(f"{op} x{v['count']} {v['wire_gib_per_device']} GiB" for op, v in result["collectives"].items())
          + f", compiled in {compile_s:.0f} s", flush=True)
    return result


def parse_mesh(text: str) -> dict:
    return {k: int(v) for k, v in (part.split("=") for part in text.split(","))}


def main():
    layers.CPU_BLOCKED_ATTENTION = False  # compile the attention GPUs and TPUs run (batch-shardable)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meshes", nargs="+", default=["data=8", "fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2"])
    parser.add_argument("--per-device-batch", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = parser.parse_args()
    results = [bench(parse_mesh(m), args.per_device_batch) for m in args.meshes]
    write_report(args.out, results, per_device_batch=args.per_device_batch, model="SD1.5 U-Net (859.5M parameters)",
                 step="AdamW + clipping + EMA, float32")


if __name__ == "__main__":
    main()
