"""Training step, jdiff vs diffusers (PyTorch) on this machine, float32, AdamW, same random weights;
and the compiled memory of an SD1.5-shaped U-Net train step with and without remat.

1. The 12.8M-parameter U-Net (blocks 64/128/256) on 32x32x4 latents, batch 8: one optimizer step
   (forward, backward, AdamW update) of epsilon-prediction MSE. Both sides start from the same
   weights (written by diffusers, loaded by jdiff) and see the same batch; their losses over the
   first steps are compared before anything is timed. jdiff is timed in a child process that never
   imports PyTorch: in one process, some runs had every jdiff step 1.5x slower (the two libraries'
   thread pools on two cores), while a torch-free process never did.
2. SD1.5's U-Net (860M parameters, 64x64x4 latents, 77x768 context), batch 8: the train step is
   compiled, never run, and XLA's memory analysis reports what one device would need, with and
   without remat, under XLA:CPU's default and memory-optimised schedulers (each in its own process).

    python bench/train.py                  # both parts, results to bench/results/train.json
    python bench/train.py --only step --repeats 5   # keeps the memory results already in the file
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdiff.app import huge_pages, xla_flags  # noqa: E402

xla_flags.use_cpu_flags()  # what train.py runs with (oneDNN kernels); before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from report import command_line, seconds, write_report  # noqa: E402

from jdiff.convert import load_unet  # noqa: E402
from jdiff.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402

LEARNING_RATE, WEIGHT_DECAY = 1e-4, 1e-2  # torch.optim.AdamW's defaults otherwise (betas, eps)


def jdiff_train_step(module):
    """(params, opt_state, x, t, context, target) -> (params, opt_state, loss), buffers donated."""
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def loss_fn(params, x, t, context, target):
        return jnp.mean((module.apply({"params": params}, x, t, context) - target) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, t, context, target):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, t, context, target)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, step


def json_from_child(*args: str, env: dict | None = None) -> dict:
    """Runs this script with `args` in a fresh process and returns the JSON of its last output line."""
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_step(folder: Path, repeats: int, batch: int = 8) -> dict:
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from sampling import MODELS

    spec = MODELS["small"]["unet"]
    torch.manual_seed(0)
    model = TorchUNet(**spec).train()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    model.save_pretrained(folder / "unet")
    size, width = spec["sample_size"], spec["cross_attention_dim"]
    x, target = torch.randn(batch, 4, size, size), torch.randn(batch, 4, size, size)
    t = torch.randint(0, 1000, (batch,))
    context = torch.randn(batch, 77, width)
    nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)
    np.savez(folder / "inputs.npz", x=nhwc(x), t=t.numpy(), context=context.numpy(), target=nhwc(target))
    torch_opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def torch_step():
        torch_opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x, t, context).sample, target)
        loss.backward()
        torch_opt.step()
        return loss.item()

    print("[step] checking that both sides train alike (3 steps), then timing...", flush=True)
    torch_losses = [torch_step() for _ in range(3)]
    torch_times = seconds(torch_step, repeats)
    # The child runs under the glibc tunables train.py restarts itself with; PyTorch under this
    # process's (results record both).
    child_env = huge_pages.environment(dict(os.environ))
    jdiff = json_from_child("--step-child", str(folder), "--repeats", str(repeats), env=child_env)
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(jdiff["losses"], torch_losses))
    print(f"[step] losses PyTorch {torch_losses}, jdiff {jdiff['losses']} (max rel. diff {loss_error:.1e})", flush=True)
    result = dict(
        name=f"unet_small_train_step_b{batch}_{size}x{size}", params_millions=round(params_m, 2), batch=batch,
        latent=f"{size}x{size}x4", optimizer="AdamW lr 1e-4 wd 1e-2", torch_s=float(np.median(torch_times)),
        jdiff_s=float(np.median(jdiff["times"])), jdiff_compile_s=jdiff["compile_s"], torch_runs=torch_times,
        jdiff_runs=jdiff["times"], jdiff_process="child, without torch",
        torch_glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
        jdiff_glibc_tunables=(child_env or os.environ).get("GLIBC_TUNABLES", ""), losses_torch=torch_losses,
        losses_jdiff=jdiff["losses"], max_rel_loss_diff=loss_error)
    result["ratio_jdiff_over_torch"] = result["jdiff_s"] / result["torch_s"]
    # The best run too: on this shared machine single steps of either side vary by up to 1.5x, and
    # noise only ever adds time.
    result["torch_best_s"], result["jdiff_best_s"] = min(torch_times), min(jdiff["times"])
    result["best_ratio_jdiff_over_torch"] = result["jdiff_best_s"] / result["torch_best_s"]
    print(f"[step] median PyTorch {result['torch_s']:.3f} s, jdiff {result['jdiff_s']:.3f} s "
          f"(ratio {result['ratio_jdiff_over_torch']:.2f}); best PyTorch {result['torch_best_s']:.3f} s, "
          f"jdiff {result['jdiff_best_s']:.3f} s (ratio {result['best_ratio_jdiff_over_torch']:.2f}); "
          f"compile {jdiff['compile_s']:.1f} s", flush=True)
    return result


def jdiff_step_times(folder: Path, repeats: int) -> dict:
    """The jdiff side of `bench_step` (run in a child process): 3 steps' losses, then timed steps."""
    module, params = load_unet(folder / "unet")
    optimizer, step = jdiff_train_step(module)
    opt_state = optimizer.init(params)
    data = np.load(folder / "inputs.npz")
    inputs = tuple(jnp.asarray(data[k]) for k in ("x", "t", "context", "target"))
    start = time.perf_counter()
    step = step.lower(params, opt_state, *inputs).compile()
    compile_s = time.perf_counter() - start
    losses = []
    for _ in range(3):
        params, opt_state, loss = step(params, opt_state, *inputs)
        losses.append(float(loss))

    def once():
        nonlocal params, opt_state
        params, opt_state, loss = step(params, opt_state, *inputs)
        loss.block_until_ready()

    return dict(losses=losses, times=seconds(once, repeats), compile_s=compile_s)


# XLA:CPU's default scheduler orders the recomputed forward pass so that its peak memory does not
# drop (measured on a 12.8M U-Net: 4172 MiB temporaries without remat, 4175 with); the
# memory-optimised scheduler is what makes remat pay on CPU (3659 -> 1438 MiB). GPU and TPU
# schedulers are memory-aware by default.
def compiled_memory_in_child(remat: bool, scheduler_flags: tuple[str, ...]) -> dict:
    """`compiled_memory` in a fresh process: XLA reads its flags once, when the backend starts."""
    env = dict(os.environ, XLA_FLAGS=xla_flags.with_flags(os.environ.get("XLA_FLAGS", ""), scheduler_flags))
    result = json_from_child("--memory-child", str(int(remat)), env=env)
    result["xla_flags"] = env["XLA_FLAGS"]
    return result


def compiled_memory(remat: bool, batch: int = 8) -> dict:
    """XLA's memory analysis of the SD1.5 U-Net train step (AdamW), compiled from shapes only."""
    config = UNetConfig(sample_size=64, cross_attention_dim=768)
    module = UNet2DConditionModel(config, gradient_checkpointing=remat)
    x = jax.ShapeDtypeStruct((batch, 64, 64, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    context = jax.ShapeDtypeStruct((batch, 77, 768), jnp.float32)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(x.shape), jnp.zeros(t.shape),
                                                jnp.zeros(context.shape))["params"])
    optimizer, step = jdiff_train_step(module)
    opt_state = jax.eval_shape(optimizer.init, params)
    start = time.perf_counter()
    memory = step.lower(params, opt_state, x, t, context, x).compile().memory_analysis()
    compile_s = time.perf_counter() - start
    gib = lambda n: round(n / 2**30, 3)
    param_bytes = sum(np.prod(p.shape) * p.dtype.itemsize for p in jax.tree.leaves(params))
    result = dict(
        name=f"unet_sd15_train_step_b{batch}_64x64_{'remat' if remat else 'no_remat'}", remat=remat, batch=batch,
        params_millions=round(param_bytes / 4e6, 1), param_gib=gib(param_bytes),
        argument_gib=gib(memory.argument_size_in_bytes), output_gib=gib(memory.output_size_in_bytes),
        alias_gib=gib(memory.alias_size_in_bytes), temp_gib=gib(memory.temp_size_in_bytes),
        total_gib=gib(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                      + memory.temp_size_in_bytes),
        compile_s=compile_s)
    print(f"[memory] remat={remat} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}: temporaries "
          f"{result['temp_gib']} GiB, total {result['total_gib']} GiB (arguments {result['argument_gib']} GiB), "
          f"compiled in {compile_s:.0f} s", file=sys.stderr, flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["step", "memory"], default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    parser.add_argument("--memory-child", type=int, choices=[0, 1], help=argparse.SUPPRESS)
    parser.add_argument("--step-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        print(json.dumps(compiled_memory(bool(args.memory_child))))
        return
    if args.step_child is not None:
        print(json.dumps(jdiff_step_times(Path(args.step_child), args.repeats)))
        return
    import torch
    torch.set_num_threads(os.cpu_count())

    results = []
    if args.only in (None, "step"):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(bench_step(Path(tmp), args.repeats))
    if args.only in (None, "memory"):
        for scheduler, flags in (("default", ()), ("memory_optimized", xla_flags.MEMORY_SCHEDULER)):
            without, with_remat = (compiled_memory_in_child(remat, flags) for remat in (False, True))
            for result in (without, with_remat):
                result["name"] += f"_{scheduler}_scheduler"
            with_remat["temp_ratio_remat_over_no_remat"] = with_remat["temp_gib"] / without["temp_gib"]
            results += [without, with_remat]
    for result in results:
        result["command"] = command_line()
    if args.only and Path(args.out).is_file():  # keep the other part's results (each names its command)
        other = "unet_sd15" if args.only == "step" else "unet_small"
        kept = [r for r in json.loads(Path(args.out).read_text())["results"] if r["name"].startswith(other)]
        results = results + kept if args.only == "step" else kept + results
    write_report(args.out, results)


if __name__ == "__main__":
    main()
