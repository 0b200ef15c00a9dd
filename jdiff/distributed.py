"""Joining a multi-process (multi-host) run: one process per host (TPU VM worker, GPU node or
SLURM task), all running the same command.

    initialize()                               # TPU VM pod slice, SLURM, Open MPI: detected by JAX
    initialize("10.0.0.1:1234", 2, 0)          # explicit: coordinator, process count, this process
    JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python train.py   # same, by env

With none of these it does nothing: a single process uses its local devices. On CPU (tests, and
processes on one machine) collectives between processes go through gloo.
"""

import os

import jax
import numpy as np

from jdiff.errors import ConfigError

_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS")
_TASK_COUNTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def cluster_detected() -> bool:
    """True in an environment where jax.distributed finds its peers on its own."""
    env = os.environ
    return any(k in env for k in _CLUSTER_ENV) or any(int(env.get(k, "1")) > 1 for k in _TASK_COUNTS)


def _env_int(name: str):
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer.") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> tuple[int, int]:
    """Joins the run if one is configured (arguments, JAX_* environment, or a detected cluster);
    must run before any other JAX call. Returns (process index, process count)."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = coordinator_address or num_processes is not None or process_id is not None
    if not explicit and not cluster_detected():
        return 0, 1
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise ConfigError("a multi-process run needs all of coordinator address (host:port), number of "
                          f"processes and process id (got {coordinator_address!r}, {num_processes!r}, "
                          f"{process_id!r}).")
    # CPU processes exchange data through gloo; accelerators use their own interconnect (ICI, NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()


def is_main() -> bool:
    """Process 0: the one that logs, writes images and exports."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier called `name` (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def from_main(values):
    """Process 0's `values` (an integer array) on every process: for a decision that one process
    makes from shared files and all must follow."""
    if jax.process_count() == 1:
        return np.asarray(values)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values)))


def all_processes(flag: bool) -> bool:
    """True when `flag` is true on every process (every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def main_first(name: str, fn):
    """fn() on process 0, then on the others once it has finished: for work that writes shared
    files (building the dataset, writing the tokenizer) and that the others then only read."""
    result = fn() if is_main() else None
    barrier(name)
    return result if is_main() else fn()
