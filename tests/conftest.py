"""Shared test set-up: eight fake CPU devices for the sharded paths, CPU-sized PyTorch for the
reference side."""

import os

# Must precede the first `import jax`: the sharding tests split batches over these devices.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(2)


@pytest.fixture
def one_device():
    """A `data` mesh of one device: the unsharded baseline (and faster for tiny batches)."""
    return Mesh(jax.devices()[:1], ("data",))
