"""One mesh over all devices, on one host or many: JAX's own machinery, nothing invented.

- `initialize(...)` joins a multi-process job (`jax.distributed.initialize`) when the
  environment or explicit arguments say several processes are in play.
- `make_mesh(fsdp)` builds a `Mesh` with axes ("data", "fsdp"). Batches are sharded over
  both axes (every device takes its slice); parameters and optimizer state are
  replicated, or sharded over "fsdp" when fsdp > 1.
- `shard_state` places a pytree of arrays on the mesh by that rule; `global_batch`
  assembles the processes' host batches into one global array.
"""

from __future__ import annotations

import os

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

BATCH_AXES = ("data", "fsdp")


def multi_process_env() -> bool:
    """Whether the environment describes a job of several processes (SLURM, a TPU pod, or JAX's variables)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"):
        return True
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join a multi-process job if one is asked for or detected; returns whether it did.

    Explicit arguments win; otherwise `jax.distributed.initialize()` discovers the job
    from SLURM, a TPU pod or JAX's environment variables.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "--coordinator_address, --num_processes and --process_id go together; got "
                f"{coordinator_address!r}, {num_processes!r}, {process_id!r}."
            )
        # CPU processes need a collectives backend (GPUs and TPUs bring their own); this touches no backend
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if multi_process_env():
        jax.distributed.initialize()
        return True
    return False


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (all devices by default)."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"--fsdp (={fsdp}) must divide the device count (={len(devices)}).")
    return Mesh(np.array(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 4) -> NamedSharding:
    """The leading (batch) axis over every device; with a leading steps axis use ndim+1 and shard axis 1."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Replicated, or sharded over "fsdp" along the largest axis it divides (FSDP/ZeRO-3 style)."""
    if fsdp == 1 or not shape:
        return P()
    candidates = [i for i, n in enumerate(shape) if n % fsdp == 0 and n >= fsdp]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: shape[i])
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def state_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)) if eqx.is_array(x) else None, tree
    )


def shard_state(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every array of `tree` on the mesh: replicated, or FSDP-sharded when the mesh has fsdp > 1."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    shardings = state_shardings(arrays, mesh)
    if jax.process_count() == 1:
        return eqx.combine(jax.device_put(arrays, shardings), static)

    # Several processes: each holds the same full copy (same seed); every one contributes its own shards.
    def place(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
            global_data = jax.make_array_from_callback(data.shape, sharding, lambda index: data[index])
            return jax.random.wrap_key_data(global_data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return eqx.combine(jax.tree_util.tree_map(place, arrays, shardings), static)


def global_batch(local: np.ndarray, mesh: Mesh, *, steps_axis: bool = False) -> jax.Array:
    """Assemble this process's share of a batch into the global array, sharded over the batch axis.

    With `steps_axis` the array is (K, B, ...) and the batch axis is the second.
    """
    spec = P(None, BATCH_AXES, *([None] * (local.ndim - 2))) if steps_axis else P(BATCH_AXES,
                                                                                  *([None] * (local.ndim - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(local))


def local_copy(tree: PyTree) -> PyTree:
    """The same pytree with every array fully present on this process (for evaluation and export).

    Every process must call it: sharded arrays are gathered collectively.
    """
    def fetch(x):
        if not eqx.is_array(x) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return x.addressable_data(0)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree_util.tree_map(fetch, tree)
