"""Preemption: SIGTERM or SIGINT at different moments of a training run (during a step, during an
asynchronous save, during evaluation, after the last step) saves the step in flight and stops; the
rerun resumes and ends with the same losses as a run that was never stopped. And train.py's exit."""

import dataclasses
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from compile_flags import xla_flags
from jdiff.configs import tiny
from jdiff import train_lib
from jdiff.app import stages
from jdiff.app.shapes_tfds import load_shapes
from jdiff.checkpoint import Checkpoints
from jdiff.data import make_loader, to_model_range
from jdiff.preemption import Preempted
from tiny_models import tiny_vae_train_command

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def send(signum):
    os.kill(os.getpid(), signum)


class SignalAtBatch:
    """A loader whose iterator sends `signum` to this process as batch number `at` (1-based) is drawn."""

    def __init__(self, loader, at: int, signum):
        self.loader, self.at, self.signum = loader, at, signum

    def __iter__(self):
        outer, inner = self, iter(self.loader)

        class Iterator:
            drawn = 0

            def __next__(self):
                self.drawn += 1
                if self.drawn == outer.at:
                    send(outer.signum)
                return next(inner)

            def get_state(self):
                return inner.get_state()

            def set_state(self, state):
                inner.set_state(state)

        return Iterator()


def run(workdir, data_dir, *, loader_wrapper=None, evaluate_hook=None):
    """The tiny VAE stage for STEPS steps on one device (checkpoints every 3, evaluation every 2),
    started or resumed in workdir; returns train()'s result."""
    config = tiny.get_config()
    config.vae_train.update(steps=STEPS, log_every=1, checkpoint_every=3, eval_every=2, num_devices=1)
    source = load_shapes(data_dir, "train", num_train=64, num_test=16)
    stage = stages.vae_stage(config, to_model_range(np.stack([source[i]["image"] for i in range(2)])))
    if evaluate_hook:
        def evaluate(params, step, original=stage.evaluate):
            evaluate_hook(step)
            return original(params, step)

        stage = dataclasses.replace(stage, evaluate=evaluate)
    loader = make_loader(source, batch_size=8, seed=0)
    if loader_wrapper:
        loader = loader_wrapper(loader)
    return train_lib.train(stage, config.vae_train, workdir, loader, total_batch=8)


def losses(history):
    return [h["loss"] for h in history]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_shapes_dir):
    """The losses of the run that nobody stops."""
    return losses(run(tmp_path_factory.mktemp("uninterrupted"), tiny_shapes_dir).history)


def stopped_then_resumed(workdir, data_dir, **interrupt):
    """Runs with the interruption, then reruns the same run; returns (Preempted, the rerun's losses,
    the step the rerun started from)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Preempted) as stopped:
        run(workdir, data_dir, **interrupt)
    # The loop gave the handlers back (compared with what they were: a shell may start us with SIGINT ignored).
    assert {s: signal.getsignal(s) for s in before} == before
    assert Checkpoints(workdir / "checkpoints").steps()[-1] == stopped.value.step, "the stop step was saved"
    resumed = run(workdir, data_dir)
    started = resumed.history[0]["step"] - 1 if resumed.history else int(resumed.state.step)
    return stopped.value, losses(resumed.history), started


def test_sigterm_during_a_step_saves_it_and_the_rerun_matches(tmp_path, tiny_shapes_dir, reference):
    # Sent while batch 2 is drawn: step 2 runs, is saved (not a regular checkpoint step), and the run stops.
    stopped, after, resumed_from = stopped_then_resumed(
        tmp_path, tiny_shapes_dir, loader_wrapper=lambda loader: SignalAtBatch(loader, 2, signal.SIGTERM))
    assert (stopped.step, stopped.signum, stopped.exit_code) == (2, signal.SIGTERM, 143)
    assert resumed_from == 2
    np.testing.assert_allclose(after, reference[2:], rtol=1e-6)


def test_two_sigints_during_an_asynchronous_save_leave_both_checkpoints_whole(tmp_path, tiny_shapes_dir, reference,
                                                                           monkeypatch):
    save = Checkpoints.save

    def save_then_interrupt(self, step, state, meta):
        save(self, step, state, meta)  # returns with the write still running in the background
        if step == 3:
            send(signal.SIGINT)
            send(signal.SIGINT)  # "again": must not cut the save short

    monkeypatch.setattr(Checkpoints, "save", save_then_interrupt)
    with pytest.raises(Preempted) as stopped:
        run(tmp_path, tiny_shapes_dir)
    monkeypatch.setattr(Checkpoints, "save", save)
    assert (stopped.value.step, stopped.value.exit_code) == (4, 130)
    assert Checkpoints(tmp_path / "checkpoints").steps() == [3, 4]
    after = losses(run(tmp_path, tiny_shapes_dir).history)
    np.testing.assert_allclose(after, reference[4:], rtol=1e-6)


def test_sigterm_during_evaluation_stops_after_the_next_step(tmp_path, tiny_shapes_dir, reference):
    hook = lambda step: send(signal.SIGTERM) if step == 2 else None  # noqa: E731
    stopped, after, resumed_from = stopped_then_resumed(tmp_path, tiny_shapes_dir, evaluate_hook=hook)
    assert stopped.step == 3 and resumed_from == 3
    np.testing.assert_allclose(after, reference[3:], rtol=1e-6)


def test_sigterm_during_the_last_evaluation_still_reports_the_stop(tmp_path, tiny_shapes_dir, reference):
    # The loop has no step left to stop after; the stage is finished and saved, and the caller must
    # still learn of the signal (or the recipe would go on to its next stage).
    hook = lambda step: send(signal.SIGTERM) if step == STEPS else None  # noqa: E731
    stopped, after, resumed_from = stopped_then_resumed(tmp_path, tiny_shapes_dir, evaluate_hook=hook)
    assert stopped.step == STEPS and after == [] and resumed_from == STEPS


def test_train_py_exits_143_on_sigterm_and_the_same_command_resumes(tmp_path):
    workdir = tmp_path / "run"
    flags = ("--config.vae_train.checkpoint_every=1000", "--config.vae_train.log_every=1")
    command = tiny_vae_train_command(workdir, *flags)
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    if os.environ.get("JDIFF_TEST_COMPILE_CACHE"):
        env.update(JAX_COMPILATION_CACHE_DIR=os.environ["JDIFF_TEST_COMPILE_CACHE"],
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        deadline = time.time() + 300
        for line in process.stdout:  # training has begun once a step is logged
            output.append(line)
            if "step 2/" in line:
                process.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline, "".join(output)
        output.append(process.communicate(timeout=120)[0])
    finally:
        process.kill()
    text = "".join(output)
    assert process.returncode == 143, text
    found = re.search(r"stopped by SIGTERM after step (\d+); its checkpoint is saved in", text)
    assert found, text
    saved = int(found.group(1))
    assert saved >= 2 and Checkpoints(workdir / "vae" / "checkpoints").steps() == [saved]

    rerun = subprocess.run(tiny_vae_train_command(workdir, *flags, steps=saved + 1), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {saved}" in rerun.stdout + rerun.stderr


def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm(tmp_path):
    from multiprocess_test import free_port

    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2"), "JAX_PLATFORMS": "cpu"}
    command = tiny_vae_train_command(
        tmp_path / "run", "--config.vae_train.checkpoint_every=1000", "--config.vae_train.log_every=1",
        f"--config.data.data_dir={tmp_path / 'data'}", "--coordinator_address", address, "--num_processes", "2")
    load_shapes(tmp_path / "data", "train", num_train=64, num_test=16)
    workers = [subprocess.Popen(command + ["--process_id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    output = []
    try:
        for line in workers[0].stdout:  # process 0 logs the steps
            output.append(line)
            if "step 3/" in line:
                workers[1].send_signal(signal.SIGTERM)  # only the second host is told
                break
        logs = ["".join(output) + workers[0].communicate(timeout=300)[0], workers[1].communicate(timeout=300)[0]]
    finally:
        for worker in workers:
            worker.kill()
    saved = []
    for worker, log in zip(workers, logs):
        assert worker.returncode == 143, log[-3000:]
        found = re.search(r"stopped by SIGTERM after step (\d+)", log)
        assert found, log[-3000:]
        saved.append(int(found.group(1)))
    assert saved[0] == saved[1] >= 3
    assert Checkpoints(tmp_path / "run" / "vae" / "checkpoints").steps() == [saved[0]]
