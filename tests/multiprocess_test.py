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


@pytest.mark.slow
def test_two_processes_split_sample_py_and_its_files_between_them(tmp_path, tiny_sd_folder):
    """sample.py on two processes (two devices each) into one shared folder: each process writes the
    PNGs of its own images, and the folder holds what one process with four devices writes."""
    root = WORKER.parents[1]
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")

    def command(out):
        return [sys.executable, str(root / "sample.py"), "--model", str(tiny_sd_folder), "--prompts-file",
                str(tmp_path / "prompts.txt"), "--num-images", "5", "--batch-size", "4", "--steps", "2",
                "--sampler", "euler", "--out", str(out)]

    def env(devices):
        return {**os.environ, "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices}"),
                "JAX_PLATFORMS": "cpu"}

    one = subprocess.run(command(tmp_path / "one"), env=env(4), capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    def two_processes(outs):
        address = f"127.0.0.1:{free_port()}"
        workers = [subprocess.Popen(command(out) + ["--coordinator-address", address, "--num-processes", "2",
                                                    "--process-id", str(i)],
                                    env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for i, out in enumerate(outs)]
        logs = [w.communicate(timeout=900)[0] for w in workers]
        for worker, log in zip(workers, logs):
            assert worker.returncode == 0, log[-3000:]
        return logs

    logs = two_processes([tmp_path / "two", tmp_path / "two"])
    assert "process 0: wrote 5 of the images" in logs[0]  # 10 images: the even ones ...
    assert "process 1: wrote 5 of the images" in logs[1]  # ... and the odd ones
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == [f"{i:05d}.png" for i in range(10)] + ["grid.png", "manifest.jsonl", "run.json"]
    assert (tmp_path / "two" / "manifest.jsonl").read_text() == (tmp_path / "one" / "manifest.jsonl").read_text()
    from jdiff import image_io

    for name in names:
        if name.endswith(".png"):
            np.testing.assert_allclose(image_io.load_image(tmp_path / "two" / name),
                                       image_io.load_image(tmp_path / "one" / name), atol=1.5 / 255, err_msg=name)
            assert image_io.read_png_parameters(tmp_path / "two" / name) == \
                image_io.read_png_parameters(tmp_path / "one" / name)
    # Hosts that do not share the folder (each its own disk): process 0 writes every file.
    logs = two_processes([tmp_path / "host0", tmp_path / "host1"])
    assert "process 0: wrote 10 of the images" in logs[0] and "process 1: wrote 0 of the images" in logs[1]
    assert sorted(p.name for p in (tmp_path / "host0").iterdir()) == names and not (tmp_path / "host1").exists()
