"""Orbax storage of parameter trees (model folders written by the converters)."""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def save_params(path: str, params: Any) -> None:
  """Write a params tree (numpy or jax arrays) as an orbax checkpoint at `path`."""
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params, force=True)


def restore_params(path: str, abstract: Any) -> Any:
  """Read a params tree; `abstract` gives shapes, dtypes and (optionally) target shardings as
  `jax.ShapeDtypeStruct`s, so each tensor is placed directly where it belongs."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(path), abstract)
