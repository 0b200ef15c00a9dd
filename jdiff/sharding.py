"""Device meshes, and where every array of a train state lives on them.

Three mesh axes, as in maxdiffusion:

    data    the batch is split, parameters are replicated (plain data parallelism)
    fsdp    the batch is split AND parameters, optimizer moments and EMA weights are sharded
            (ZeRO-3): XLA all-gathers a layer's weights where they are used and reduce-scatters
            their gradients, so each device holds about 1/fsdp of the state
    tensor  inside transformer blocks, attention heads and MLP hidden units are split (Megatron):
            q/k/v and the MLP's first layer by output, the output projections by input

Every parameter dimension gets a logical name from the layer it belongs to (`logical_axes`), and
`RULES` map logical names to mesh axes. A dimension a mesh axis does not divide stays whole on that
axis; a large leaf that no rule put on `fsdp` is split over it along its largest divisible dimension.
Optimizer moments and EMA weights mirror their parameter's path, so one function lays out the whole
train state; scalars (step, counts, rng) are replicated.
"""

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jdiff.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the leading (batch) dimension of inputs is split over both

# logical dimension name -> mesh axis
RULES = {
    "embed": "fsdp",  # a weight's model-width side
    "conv_out": "fsdp",  # a convolution's output channels
    "heads": "tensor",  # attention projections' head side
    "mlp": "tensor",  # MLP hidden units
}
# Layer names by role: CLIP (q_proj, fc1), diffusers' attention and FeedForward (to_q, net_2), the
# text stream of SD3/Flux joint attention (add_q_proj, to_add_out), Flux's single-stream MLP
# (proj_mlp), T5 (q, o, wi_0, wo).
_COLUMN_PARALLEL = {"to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj", "add_q_proj", "add_k_proj", "add_v_proj",
                    "q", "k", "v"}  # (embed, heads)
_ROW_PARALLEL = {"to_out_0", "out_proj", "to_add_out", "o"}  # (heads, embed)
_MLP_IN = {"fc1", "proj", "proj_mlp", "wi", "wi_0", "wi_1"}  # (embed, mlp); "proj": diffusers' GEGLU/GELU input
_MLP_OUT = {"fc2", "net_2", "wo"}  # (mlp, embed)
MIN_FSDP_SIZE = 1 << 14  # leaves smaller than this (norms, biases) are not worth a collective


def mesh_shape(config, device_count: int) -> dict:
    """{"data": d, "fsdp": f, "tensor": t} from config.mesh; one axis may be -1 (the rest)."""
    sizes = {axis: int(config.get(axis, 1)) for axis in MESH_AXES}
    unknown = set(config.keys()) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}.")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ConfigError(f"mesh sizes must be positive, with at most one -1 (got {sizes}).")
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if free:
        if device_count % fixed:
            raise ConfigError(f"mesh {sizes}: {device_count} devices do not divide by {fixed}.")
        sizes[free[0]] = device_count // fixed
    if int(np.prod(list(sizes.values()))) != device_count:
        raise ConfigError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices but "
                          f"{device_count} are used.")
    return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None, num_devices: int = 0) -> Mesh:
    """The one mesh builder: a (data, fsdp, tensor) mesh over `devices` (default: every device of
    every process), or over the first `num_devices` of them (0 = all; fewer is for single-process
    tests and benchmarks).

    Devices are ordered by process, then by id, so the batch dimension (data x fsdp, row-major)
    gives each process one contiguous block of every global batch.
    """
    devices = list(devices if devices is not None else jax.devices())
    if num_devices:
        if num_devices > len(devices):
            raise ConfigError(f"num_devices = {num_devices} but only {len(devices)} devices are visible.")
        if num_devices < len(devices) and jax.process_count() > 1:
            raise ConfigError("num_devices must be 0 (every device) when several processes train together.")
        devices = devices[:num_devices]
    devices.sort(key=lambda d: (d.process_index, d.id))
    sizes = mesh_shape(mesh_config, len(devices))
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def batch_size_per_process(mesh: Mesh, global_batch: int) -> int:
    """This process's share of a global batch, checking that it splits over the batch axes."""
    shards = batch_shards(mesh)
    if global_batch % shards:
        raise ConfigError(f"batch_size {global_batch} does not split over data x fsdp = {shards} devices.")
    if global_batch % jax.process_count():
        raise ConfigError(f"batch_size {global_batch} does not split over {jax.process_count()} processes.")
    return global_batch // jax.process_count()


def batch_axes(mesh: Mesh) -> tuple:
    return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def batch_shards(mesh: Mesh) -> int:
    """Into how many pieces the batch dimension is split."""
    return int(np.prod([mesh.shape[axis] for axis in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def logical_axes(path: Sequence[str], shape: Sequence[int]) -> tuple:
    """Logical names of a parameter's dimensions, from its layer name and rank."""
    names = list(path)
    layer = names[-2] if len(names) >= 2 else ""
    leaf = names[-1] if names else ""
    if len(shape) == 4:  # convolution kernel [kh, kw, in, out]
        return (None, None, "conv_in", "conv_out")
    if len(shape) == 2 and leaf == "embedding":  # [vocab or positions, width]
        return ("vocab", "embed")
    if len(shape) == 2:  # dense kernel [in, out]
        if layer in _COLUMN_PARALLEL:
            return ("embed", "heads")
        if layer in _ROW_PARALLEL:
            return ("heads", "embed")
        if layer in _MLP_IN:
            return ("embed", "mlp")
        if layer in _MLP_OUT:
            return ("mlp", "embed")
        return ("embed", "hidden")
    return (None,) * len(shape)  # biases, norms, scalars


def partition_spec(path: Sequence[str], shape: Sequence[int], mesh: Mesh) -> P:
    """The PartitionSpec of one leaf: `RULES` where the mesh axis divides the dimension, then
    `fsdp` on the largest divisible dimension of a large leaf that is not yet on it."""
    spec: list[Any] = [None] * len(shape)
    used = set()
    for dim, name in enumerate(logical_axes(path, shape)):
        axis = RULES.get(name)
        size = mesh.shape.get(axis, 1)
        if axis and axis not in used and size > 1 and shape[dim] % size == 0:
            spec[dim] = axis
            used.add(axis)
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and "fsdp" not in used and int(np.prod(shape)) >= MIN_FSDP_SIZE:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
        if free:
            spec[max(free, key=lambda d: shape[d])] = "fsdp"
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of a pytree of arrays or ShapeDtypeStructs (a train state,
    parameters, optimizer state): parameters by `partition_spec`, optimizer moments and EMA copies
    like the parameter whose path they end with, scalars replicated."""

    def leaf_sharding(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, partition_spec(_names(path), shape, mesh) if shape else P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: the target layout of a restore or a compile."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def put(tree: Any, shardings: Any) -> Any:
    """Host values (the same on every process) as global arrays with `shardings`; each process
    fills only its own devices' shards, so this works on any number of hosts."""
    def place(value, target):
        if isinstance(value, jax.Array) and value.is_fully_addressable is False:
            return jax.jit(lambda x: x, out_shardings=target)(value)  # already global: reshard
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

    return jax.tree.map(place, tree, shardings)


def gather(tree: Any) -> Any:
    """A pytree of global arrays as host numpy values, whole on every process (for export)."""
    def fetch(value):
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            value = jax.jit(lambda x: x, out_shardings=NamedSharding(value.sharding.mesh, P()))(value)
            return np.asarray(value.addressable_data(0))
        return np.asarray(value)

    return jax.tree.map(fetch, tree)


def bytes_per_device(tree: Any) -> dict:
    """{device id: bytes of `tree`'s arrays stored on it} (addressable shards only)."""
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes
    return totals
