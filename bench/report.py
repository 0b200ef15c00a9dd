"""What every benchmark writes next to its results: the command, the machine and the versions."""

import json
import os
import platform
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]


def command_line() -> str:
    """How this benchmark was started, relative to the repository root."""
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def cpu_model() -> str:
    """The CPU's model name and flags that change XLA:CPU's kernels (AVX-512, AMX), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    extensions = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}; " \
           f"{' '.join(extensions) or 'no AVX2'})"


def torch_version() -> str | None:
    try:  # bench/device.py runs on accelerator hosts that may not have PyTorch
        import torch
    except ImportError:
        return None
    return torch.__version__


def write_report(out, results: list, **extra) -> None:
    report = dict(
        command=command_line(),
        machine=dict(cpus=os.cpu_count(), platform=platform.platform(), processor=platform.processor(),
                     cpu_model=cpu_model()),
        versions=dict(jax=jax.__version__, torch=torch_version(), python=platform.python_version()),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        **extra,
        results=results,
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def seconds(fn, repeats: int) -> list[float]:
    """Wall time of each of `repeats` calls of fn (here, not in bench/models.py, so a timing child
    process need not import PyTorch)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
