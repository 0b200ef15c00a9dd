"""jdiff's XLA:CPU flags: added as groups, never over a flag the user set."""

import json
import os
import subprocess
import sys
from pathlib import Path

from compile_flags import BASE_FLAGS
from jdiff.app import xla_flags


def test_flags_are_added_once_and_user_settings_win():
    both = xla_flags.with_flags("", xla_flags.ONEDNN, xla_flags.MEMORY_SCHEDULER)
    assert both.split() == list(xla_flags.ONEDNN + xla_flags.MEMORY_SCHEDULER)
    assert xla_flags.with_flags(both, xla_flags.ONEDNN, xla_flags.MEMORY_SCHEDULER) == both
    # Opting out of oneDNN keeps the whole group out; other flags stay in place.
    user = "--xla_force_host_platform_device_count=8 --xla_cpu_use_onednn=false"
    assert xla_flags.with_flags(user, xla_flags.ONEDNN) == user


def test_use_cpu_flags_sets_the_environment(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    xla_flags.use_cpu_flags(remat=True)
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=8"
    assert set(xla_flags.ONEDNN + xla_flags.NO_YNNPACK_CONVOLUTIONS + xla_flags.MEMORY_SCHEDULER) <= set(flags)


_GRADIENT_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, {root!r})
from jdiff.models.unet import UNet2DConditionModel, UNetConfig

config = UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                    cross_attention_dim=32, attention_head_dim=8,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
unet = UNet2DConditionModel(config)
keys = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(keys[0], (2, 8, 8, 4))
context = jax.random.normal(keys[1], (2, 7, 32))
t = jnp.array([10, 900])
params = unet.init(keys[2], x, t, context)["params"]
loss = lambda p: jnp.mean((unet.apply({{"params": p}}, x, t, context) - x) ** 2)
value, grads = jax.jit(jax.value_and_grad(loss))(params)
norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
print(json.dumps({{"loss": float(value), "norms": norms}}))
"""


def test_training_flags_give_the_default_kernels_results():
    """train.py runs XLA:CPU with oneDNN kernels and convolutions off YNNPACK; the tests otherwise run
    XLA's defaults (the persistent compilation cache cannot store oneDNN fusions). A U-Net gradient
    must agree between the two."""
    script = _GRADIENT_SCRIPT.format(root=str(Path(__file__).resolve().parents[1]))
    results = {}
    base = " ".join(BASE_FLAGS)
    train_flags = xla_flags.with_flags(base, *xla_flags.TRAINING)
    for name, flags in (("default", base), ("training", train_flags)):
        env = dict(os.environ, XLA_FLAGS=flags)
        out = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    default, onednn = results["default"], results["training"]
    assert abs(default["loss"] - onednn["loss"]) <= 1e-5 * abs(default["loss"])
    assert len(default["norms"]) == len(onednn["norms"]) > 20
    for a, b in zip(default["norms"], onednn["norms"]):
        assert abs(a - b) <= 1e-4 * max(abs(a), 1e-6), (a, b)
