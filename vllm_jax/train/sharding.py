"""Device meshes and the one table that maps logical axis names to mesh axes."""

import contextlib
import math
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
  """Shardings for a boxed abstract params tree (from `jax.eval_shape(model.init, ...)`)."""
  return logical_to_sharding(nn.get_partition_spec(boxed_abstract), mesh)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def shard_params(params: Any, shardings: Any) -> Any:
  """Place host (numpy) parameters onto the mesh, one tensor at a time."""
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, shardings)
