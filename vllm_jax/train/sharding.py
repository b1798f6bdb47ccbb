"""Device meshes and the one table that maps logical axis names to mesh axes."""

import contextlib
import math
import os
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes). Parameters are sharded over `fsdp` along their model
# width and over `tensor` along heads/MLP/vocab; activations split the batch over data x fsdp.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("act_embed", None),
    ("head_dim", None),
    ("length", None),
    ("frames", None),
    ("queries", None),
    ("patch", None),
    ("layers", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 for "all the remaining devices"."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"{len(devices)} are available")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[None]:
  """Make `mesh` and the rules table current, so logical constraints take effect under jit."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


def logical_to_sharding(logical_specs: Any, mesh: Mesh) -> Any:
  """A pytree of logical PartitionSpecs -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


def param_shardings(boxed_abstract: Any, mesh: Mesh) -> Any:
  """Shardings for a boxed abstract params tree (from `jax.eval_shape(model.init, ...)`). A mesh
  that does not divide some parameter's sharded axes is refused, naming the parameters."""
  shardings = logical_to_sharding(nn.get_partition_spec(boxed_abstract), mesh)
  uneven = []
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed_abstract)),
                                (s.spec for s in jax.tree.leaves(shardings))):
    for axis, (size, names) in enumerate(zip(leaf.shape, spec)):
      names = (names,) if isinstance(names, str) else tuple(names or ())
      parts = math.prod(mesh.shape[name] for name in names)
      if size % parts:
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        uneven.append(f"{where} {list(leaf.shape)} (axis {axis} over {' x '.join(names)} = {parts})")
  if uneven:
    mesh_text = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
    raise ValueError(f"the mesh ({mesh_text}) does not divide {len(uneven)} parameter(s): {', '.join(uneven[:3])}"
                     f"{' ...' if len(uneven) > 3 else ''}; choose mesh sizes that divide them")
  return shardings


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def shard_params(params: Any, shardings: Any) -> Any:
  """Place host (numpy) parameters onto the mesh, one tensor at a time."""
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, shardings)


def mesh_from_config(cfg) -> Mesh:
  """A mesh from a `mesh` config section (data, fsdp, tensor; -1 = the remaining devices)."""
  return make_mesh((cfg.data, cfg.fsdp, cfg.tensor))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split along their leading axis over every data-parallel axis (data x fsdp)."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def make_global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """This process's rows ([B / process_count, ...] numpy arrays) -> global [B, ...] arrays, with
  each process contributing the rows that live on its own devices."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def initialize_distributed(heartbeat_timeout_seconds: int = 30, initialization_timeout: int = 120) -> None:
  """Join the job's other processes, if there are any.

  Explicit set-up (launch/local.py): JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
  Under SLURM jax reads the job's variables itself; TPU pod hosts connect without this call. A lost
  peer is noticed within `heartbeat_timeout_seconds`, and the survivors then exit with an error
  instead of hanging.
  """
  env = os.environ
  kwargs = dict(heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                initialization_timeout=initialization_timeout)
  if "JAX_NUM_PROCESSES" in env:
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]), **kwargs)
  elif int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize(**kwargs)
