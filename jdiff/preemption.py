"""Stopping a training run cleanly when the machine is taken away: on SIGTERM (spot and preemptible
VMs, SLURM's `--signal`, Kubernetes) or SIGINT (Ctrl-C), finish the step in flight, save a checkpoint,
and leave with `Preempted`, so that rerunning the same command resumes exactly.

One process: Python handlers record the first signal; the loop asks `stop_now(step)` after every step,
which costs nothing. Several processes: JAX's preemption service (started by
`jax.distributed.initialize`) catches SIGTERM on any host, tells the others, and picks one step at
which every host's `stop_now` is true together, so all hosts save the same step and none waits on a
collective the others left. SIGINT there is turned into SIGTERM for that service.

A repeated signal while the checkpoint is written is ignored (with a message): the save finishes. A
SIGKILL cannot be caught; Orbax's save is atomic, so the newest complete checkpoint survives it.
"""

import signal
import sys
import threading

from jax._src import distributed as _distributed
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after saving step `step`; rerun the same command to resume."""

    def __init__(self, stage: str, step: int, signum: int, directory):
        self.stage, self.step, self.signum, self.directory = stage, step, signum, directory
        super().__init__(f"{stage}: stopped by {signal.Signals(signum).name} after step {step}; its checkpoint is "
                         f"saved in {directory}. Run the same command again to resume from it.")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process that a signal stopped (143, 130)."""
        return 128 + self.signum


def _multi_process() -> bool:
    return _distributed.global_state.client is not None


class StopOnSignal:
    """A context manager for a training loop: while it is open, SIGTERM and SIGINT ask the loop to
    stop at a step boundary instead of killing the process. `stop_now(step)` is true from the first
    step boundary after a signal (on several processes, at the step they agreed on)."""

    def __init__(self, describe: str = "training"):
        self.describe = describe
        self.signum: int | None = None
        self._previous: dict = {}
        self._service = False

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # Python lets only the main thread set handlers; signals keep their defaults
        self._service = _multi_process() and _distributed.global_state.preemption_sync_manager is not None
        # With the service, SIGTERM belongs to it; SIGINT is forwarded to it.
        for signum in (signal.SIGINT,) if self._service else SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._service:  # `signum` is set only at the agreed step: every host must stop together
            print(f"{name}: passing it to JAX's preemption service as SIGTERM; all processes will save "
                  "the same step and stop.", file=sys.stderr, flush=True)
            signal.raise_signal(signal.SIGTERM)
            return
        if self.signum is None:
            self.signum = signum
            print(f"{name}: {self.describe} stops after the step in flight and saves a checkpoint.",
                  file=sys.stderr, flush=True)
        else:
            print(f"{name} again: still stopping; the checkpoint is being written and the process ends when "
                  "it is complete (SIGKILL would leave the previous complete checkpoint).",
                  file=sys.stderr, flush=True)

    def stop_now(self, step: int) -> bool:
        """Call after every step, with the same step numbers on every process."""
        if self._service:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None
