"""Train-state bytes of LoRA against full fine-tuning, for the SD1.5- and SDXL-shaped U-Nets, from
`jax.eval_shape` (nothing is allocated).

A train state is what `train_lib` keeps and checkpoints: the trained parameters, AdamW's two moments
and the EMA copy (four float32 copies), plus the step and key. Full fine-tuning trains every U-Net
weight; LoRA trains only the adapters, and the base weights ride along frozen (one copy, not
checkpointed). Targets are diffusers' LoRA scripts' default: every attention's to_q, to_k, to_v,
to_out.0.

    python bench/lora_memory.py        # results to bench/results/lora_memory.json
"""

import sys
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdiff import train_lib  # noqa: E402
from jdiff.lora.training import init_adapter  # noqa: E402
from jdiff.models.unet import SDXL_BASE, UNet2DConditionModel, UNetConfig, example_inputs  # noqa: E402
from report import write_report  # noqa: E402

MODELS = {"sd15": dict(sample_size=64, cross_attention_dim=768), "sdxl": SDXL_BASE}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RANKS = (4, 16, 64)


def tree_bytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def state_bytes(init_params) -> int:
    stage = train_lib.Stage("bench", init_params, loss_fn=None, prepare_batch=None)
    return tree_bytes(jax.eval_shape(lambda: train_lib.init_state(jax.random.key(0), stage, optax.adamw(1e-4))))


def main():
    results = []
    for name, fields in MODELS.items():
        unet = UNet2DConditionModel(UNetConfig.from_dict(fields))
        inputs = example_inputs(unet.config)
        params = jax.eval_shape(lambda: unet.init(jax.random.key(0), *inputs)["params"])
        full = state_bytes(lambda rng: unet.init(rng, *inputs)["params"])
        row = dict(model=name, parameters_millions=round(sum(a.size for a in jax.tree.leaves(params)) / 1e6, 1),
                   base_weights_gib=round(tree_bytes(params) / 2**30, 3),
                   full_finetune_state_gib=round(full / 2**30, 3), lora={})
        for rank in RANKS:
            adapter = jax.eval_shape(lambda: init_adapter({"unet": params}, {"unet": TARGETS}, rank, jax.random.key(0)))
            state = state_bytes(lambda rng: {"lora": init_adapter({"unet": params}, {"unet": TARGETS}, rank, rng)})
            row["lora"][f"rank_{rank}"] = dict(
                adapter_parameters_millions=round(sum(a.size for a in jax.tree.leaves(adapter)) / 1e6, 2),
                train_state_mib=round(state / 2**20, 2),
                state_plus_frozen_base_gib=round((state + tree_bytes(params)) / 2**30, 3),
                saving_vs_full=round(full / (state + tree_bytes(params)), 2))
        print(name, row, flush=True)
        results.append(row)
    write_report(Path(__file__).parent / "results" / "lora_memory.json", results,
                 note="float32 train states; LoRA on " + ", ".join(TARGETS))


if __name__ == "__main__":
    main()
