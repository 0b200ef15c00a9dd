"""Two processes on this machine (jax.distributed on 127.0.0.1, gloo collectives), two fake CPU
devices each, train, save, restore and sample exactly like one process with four devices."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from compile_flags import xla_flags

from jdiff.app.shapes_tfds import load_shapes

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp_path, name, processes: int, devices_per_process: int, straight: bool = False):
    env = {**os.environ, "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices_per_process}"),
           "STRAIGHT": "1" if straight else "0",
           "JAX_PLATFORMS": "cpu"}
    out = tmp_path / f"{name}.npz"
    args = [sys.executable, str(WORKER), str(tmp_path / name), str(tmp_path / "data"), str(out)]
    if processes > 1:
        address = f"127.0.0.1:{free_port()}"
        args = [args + [address, str(processes), str(i)] for i in range(processes)]
    else:
        args = [args]
    workers = [subprocess.Popen(a, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for a in args]
    logs = [w.communicate(timeout=900)[0] for w in workers]
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log[-3000:]
    return dict(np.load(out))


@pytest.mark.slow
def test_two_processes_train_save_restore_and_sample_like_one(tmp_path):
    load_shapes(tmp_path / "data", "train", num_train=64, num_test=16)  # the tiny config's set, built once
    # The reference trains straight through; the two processes stop, save, restore and finish.
    one = run_workers(tmp_path, "one", processes=1, devices_per_process=4, straight=True)
    two = run_workers(tmp_path, "two", processes=2, devices_per_process=2)
    assert int(one["devices"]) == int(two["devices"]) == 4 and int(two["processes"]) == 2
    assert set(one) == set(two)
    for key in one:
        # A key projection's bias shifts every score of a query equally, so softmax removes it: its
        # gradient is zero up to float noise, which Adam scales into full-size, arbitrary steps.
        if key not in ("devices", "processes") and not key.endswith("k_proj/bias"):
            np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)
    # The two workdirs hold the same checkpoints, written by both processes together.
    for stage in ("vae", "diffusion"):
        steps = lambda name: sorted(p.name for p in (tmp_path / name / stage / "checkpoints").iterdir())  # noqa
        assert steps("two") == steps("one")
