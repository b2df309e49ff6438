"""Placing the engine's arrays on a device mesh, with JAX's own SPMD machinery.

One mesh axis, ``"devices"``, serves two purposes:

* data parallelism for calibration: a batch of windows is split along the batch axis, every
  device runs the block on its share, and the Gram ``X^T X`` becomes a sum of per-device
  partial Grams (XLA inserts the all-reduce);
* row sharding for the layer problems: the rows of ``W`` (d_out) are split, ``H`` is
  replicated, so the solvers' ``W @ H`` GEMMs run where the rows live with no communication.

Placement goes through ``jax.make_array_from_callback`` with every process holding the same
host data, so the same code serves one process or several (``jax.distributed``).
Rows that do not divide the device count are padded with zero rows (each row is an independent
problem, and a zero row stays zero under every method) unless the pattern couples rows
(per-matrix sparsity), where the layer is replicated instead.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jprune.errors import JpruneError

AXIS = "devices"


def make_mesh(devices: int | str | None) -> Mesh | None:
    """``None`` or 1: no mesh; ``"auto"``: every device; ``n``: the first ``n`` devices."""
    if devices is None:
        return None
    available = jax.devices()
    count = len(available) if devices == "auto" else int(devices)
    if count < 1 or count > len(available):
        raise JpruneError(f"mesh of {count} devices requested, {len(available)} available")
    if count == 1:
        return None
    return Mesh(np.array(available[:count]), (AXIS,))


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.devices.size


def _place(array, mesh: Mesh, spec: P) -> jax.Array:
    host = np.asarray(array)
    return jax.make_array_from_callback(
        host.shape, NamedSharding(mesh, spec), lambda index: host[index]
    )


def replicate(array, mesh: Mesh | None):
    return array if mesh is None else _place(array, mesh, P())


def shard_leading(array, mesh: Mesh | None):
    """Split the leading axis over the mesh (replicate when it does not divide)."""
    if mesh is None:
        return array
    if array.shape[0] % mesh_size(mesh):
        return _place(array, mesh, P())
    return _place(array, mesh, P(AXIS))


def pad_rows(array: np.ndarray, mesh: Mesh | None) -> np.ndarray:
    """Zero rows appended so the row count divides the mesh size."""
    extra = -array.shape[0] % mesh_size(mesh)
    if not extra:
        return array
    return np.concatenate([array, np.zeros((extra, *array.shape[1:]), array.dtype)])


def to_host(array) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) array gathered into host memory."""
    if jax.process_count() > 1 and isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def initialize_distributed() -> None:
    """Join a multi-host run.

    On SLURM / Open MPI / TPU pods JAX finds the cluster by itself. Elsewhere set
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JPRUNE_NUM_PROCESSES`` and
    ``JPRUNE_PROCESS_ID`` on every host.
    """
    import os

    count, index = os.environ.get("JPRUNE_NUM_PROCESSES"), os.environ.get("JPRUNE_PROCESS_ID")
    jax.distributed.initialize(
        num_processes=None if count is None else int(count),
        process_id=None if index is None else int(index),
    )
