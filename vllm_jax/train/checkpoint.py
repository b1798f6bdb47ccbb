"""Orbax storage: parameter trees (model folders written by the converters) and training checkpoints."""

import contextlib
import dataclasses
import os
import re
import signal
from typing import Any

import grain
import grain.checkpoint  # registers grain's orbax handler
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vllm_jax import paths


TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")
CHECKPOINT = "a checkpoint (the earlier ones are kept)"


@contextlib.contextmanager
def writing(path: str, what: str):
  """An operating-system error of orbax writing `what` under `path` (a full disk, a read-only
  folder) as one OSError naming `path`: orbax raises OSErrors, or TensorStore's ValueErrors that
  carry the error code, and an asynchronous save's failure only at the next call."""
  try:
    yield
  except (OSError, ValueError) as e:
    code = e.errno if isinstance(e, OSError) else next(map(int, TENSORSTORE_OS_ERROR.findall(str(e))), None)
    if code is None:
      raise
    raise OSError(code, f"{os.strerror(code)}, writing {what}", path) from e


def save_params(path: str, params: Any) -> None:
  """Write a params tree (numpy or jax arrays) as an orbax checkpoint at `path` (any `paths` path)."""
  with writing(path, "the parameters"), ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(paths.resolve(path), params, force=True)


def restore_params(path: str, abstract: Any) -> Any:
  """Read a params tree; `abstract` gives shapes, dtypes and (optionally) target shardings as
  `jax.ShapeDtypeStruct`s, so each tensor is placed directly where it belongs."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(paths.resolve(path), abstract)


class TrainCheckpointer:
  """Training checkpoints under `directory`/<step>: the train state (all of it, or without the
  frozen parameters) and each process's data-iterator position, written asynchronously, the last
  `max_to_keep` kept. A step directory appears only once fully written, so a crash mid-save leaves
  the previous checkpoint as the latest."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               save_frozen: bool = False):
    self.directory, self.save_frozen = directory, save_frozen
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(paths.resolve(directory), options=options)

  def _state_tree(self, state) -> dict[str, Any]:
    tree = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if not self.save_frozen:
      del tree["frozen"]
    return tree

  def save(self, step: int, state, data_iterator=None, force: bool = False) -> None:
    """Start writing; returns once the arrays are copied off the devices (so `state` may be donated)."""
    items = dict(state=ocp.args.StandardSave(self._state_tree(state)))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    with writing(self.directory, CHECKPOINT):  # an earlier save's failure surfaces here
      self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, state, data_iterator=None, step: int | None = None):
    """Restore into the shapes, dtypes and shardings of `state` (a freshly initialised train state,
    whose frozen parameters are kept when the checkpoint has none); `data_iterator` is moved to
    the saved position. -> the restored state."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            self._state_tree(state))
    items = dict(state=ocp.args.StandardRestore(abstract))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return state.replace(**restored["state"])

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_partial(self, abstract: dict[str, Any], step: int) -> dict[str, Any]:
    """Only some entries of the state at `step` (e.g. "params", and "frozen" when saved), as
    `abstract` gives them (ShapeDtypeStructs with shardings; other dtypes are cast to): what
    export needs, without reading the optimizer state."""
    args = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                  partial_restore=True)
    return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]

  def wait(self) -> None:
    with writing(self.directory, CHECKPOINT):
      self.manager.wait_until_finished()

  def close(self) -> None:
    with writing(self.directory, CHECKPOINT):
      self.manager.close()


class Preemption:
  """Notices SIGTERM (TPU preemption, `scancel`), so the loop can checkpoint and stop cleanly.

  Single process: a signal handler sets a flag. Multi-process: jax's preemption service catches the
  signal, and every process stops at the same call of `reached` (all call it equally often). jax's
  sync point is one past the furthest call, counting from 0 before the first, so `reached` passes
  its call count, not the train step: a resumed run's steps would never meet a notice that came
  before its first call.
  """

  def __init__(self):
    self._signalled = False
    self._previous = None
    self._calls = 0
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self._signalled = True

  def reached(self) -> bool:
    self._calls += 1
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(self._calls)
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
