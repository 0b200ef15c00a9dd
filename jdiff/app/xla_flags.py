"""XLA:CPU flags that train.py sets (and bench/train.py, to time what train.py runs).

XLA reads XLA_FLAGS once, when JAX starts its first backend, so `use_cpu_flags` must run before
any JAX computation. A flag the user already set in XLA_FLAGS is left as the user set it, so
`XLA_FLAGS=--xla_cpu_use_onednn=false python train.py` opts out. Only the CPU backend reads these.
"""

import logging
import os

# oneDNN (the kernels PyTorch's CPU convolutions use) for dots, and for convolutions that YNNPACK
# leaves (NO_YNNPACK_CONVOLUTIONS). bench/train.py, 12.8M-parameter U-Net train step: 2.86 -> 2.43 s.
# The two fusion types go together: convolutions alone abort the compile ("partition compile
# failed") on the U-Net's gradient with this jaxlib. Not measured yet for sampling (sample.py and
# bench/sampling.py run XLA's defaults); the default U-Net's forward pass was the same speed.
ONEDNN = ("--xla_cpu_use_onednn=true",
          "--xla_cpu_experimental_onednn_fusion_type=individual_convolution,individual_dot")
# Convolutions not through YNNPACK (XLA:CPU's default library for them on x86): then oneDNN takes
# them where ONEDNN is set, Eigen otherwise. The default run's U-Net step (batch 32, 16x16x4,
# forward and backward): 283 -> 240 ms with ONEDNN, 230 ms without; bench/train.py step: 1.70 -> 1.61 s.
NO_YNNPACK_CONVOLUTIONS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
# XLA:CPU keeps remat's recomputation, but its default scheduler orders it so the peak does not drop
# (bench/train.py: the same temporaries with and without); with the memory-optimised scheduler remat
# cuts them to 0.57x on SD1.5's U-Net step.
MEMORY_SCHEDULER = ("--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",)
TRAINING = (ONEDNN, NO_YNNPACK_CONVOLUTIONS)  # the groups train.py always adds


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


def with_flags(current: str, *groups) -> str:
    """`current` XLA_FLAGS plus each group of flags none of whose names it sets yet (a user's
    `--xla_cpu_use_onednn=false` keeps the whole oneDNN group out)."""
    present = {_name(f) for f in current.split()}
    added = [f for group in groups if not present & {_name(f) for f in group} for f in group]
    return " ".join(current.split() + added)


def use_cpu_flags(*, remat: bool = False) -> None:
    """Adds jdiff's XLA:CPU flags (oneDNN, convolutions off YNNPACK; the memory-optimised scheduler
    when `remat`) to XLA_FLAGS."""
    current = os.environ.get("XLA_FLAGS", "")
    wanted = with_flags(current, *TRAINING, *([MEMORY_SCHEDULER] if remat else []))
    if wanted != current and _backend_started():
        logging.warning("XLA_FLAGS set after JAX started its backend; they apply to child processes only: %s", wanted)
    os.environ["XLA_FLAGS"] = wanted


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a private API: never fail on it
        return False
