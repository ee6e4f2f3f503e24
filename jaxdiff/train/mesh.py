"""Processes, the device mesh and how the train state and batches are laid out on it.

The mesh has a `data` axis and an `fsdp` axis. Batches are split over both (every device computes on its own
examples); parameters and optimizer state are split over `fsdp` only (each leaf on its largest dimension that the
axis divides) and replicated over `data`. With fsdp=1 this is plain data parallelism.
"""

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdiff.errors import ConfigError

BATCH_AXES = ("data", "fsdp")
# Leaves smaller than this stay replicated: splitting them saves little memory and costs a collective each.
MIN_SHARDED_SIZE = 2 ** 14


def initialize_distributed(dist_cfg):
  """Joins a multi-process run when the config or the environment describes one; a no-op otherwise.

  `distributed.coordinator_address` (or JAX_COORDINATOR_ADDRESS) with `num_processes` and `process_id` starts a run
  of explicit processes (e.g. several on 127.0.0.1); `distributed.auto=True` lets JAX detect a TPU pod, SLURM or
  Open MPI job by itself.
  """
  address = dist_cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not (address or dist_cfg.auto):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if address:
    if dist_cfg.num_processes is None or dist_cfg.process_id is None:  # e.g. JAX_COORDINATOR_ADDRESS alone
      raise ConfigError("a coordinator address needs distributed.num_processes and distributed.process_id "
                        "(or set distributed.auto=True on a TPU pod or SLURM job).")
    kwargs = dict(coordinator_address=address, num_processes=dist_cfg.num_processes,
                  process_id=dist_cfg.process_id)
  jax.distributed.initialize(**kwargs, initialization_timeout=dist_cfg.timeout_seconds)
  logging.info("Process %d of %d, %d local of %d devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def make_mesh(mesh_cfg) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over every device of every process; data=-1 takes what fsdp leaves."""
  fsdp = mesh_cfg.fsdp  # checked against the devices by config_schema.validate_for_devices
  data = jax.device_count() // fsdp if mesh_cfg.data == -1 else mesh_cfg.data
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def leaf_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Split the largest dimension that fsdp divides; replicate small or indivisible leaves."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
  return P()


def state_sharding(abstract_state, mesh: jax.sharding.Mesh):
  """A NamedSharding for every leaf of the (abstract) train state."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda leaf: NamedSharding(mesh, leaf_spec(leaf.shape, fsdp)), abstract_state)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def host_to_mesh(tree, shardings, *, process_local: bool):
  """Host (NumPy) data -> global arrays on the mesh: the one way host data enters a mesh that may span processes.

  process_local=True: each process holds only its own slice of the leading (batch) axis, in process order, as the
  input pipeline gives it. process_local=False: every process holds the whole array (sample indices, converted
  weights); each device takes its part. `shardings` is one sharding for every leaf or a tree matching `tree`.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, None if process_local else x.shape)

  return jax.tree.map(put, tree, shardings)


def barrier(name: str):
  """Waits until every process reaches the barrier of this name (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
