"""Training checkpoints: `vllm-jax train` stopped by SIGTERM resumes exactly (data order included);
kill -9 during an async save keeps the previous checkpoint."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from test_multiprocess import FAST, tiny_run
from vllm_jax.train import checkpoint, trainer
from vllm_jax.train.trainer import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
# Subprocesses: 1 CPU device; cheaper compiles (values are compared within one process only).
ENV = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST}", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def train(tmp_path_factory):
  """The tiny run's command and an environment whose runs share their compiled steps."""
  root = tmp_path_factory.mktemp("tiny_run")
  env = dict(ENV, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return tiny_run(root), env


def run(train, *args):
  command, env = train
  return subprocess.Popen(command + [f"--config.{a}" for a in args], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300) -> str:
  _, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return err


def read_state(step_dir):
  with ocp.StandardCheckpointer() as c:
    return c.restore(str(step_dir / "state"))


def test_sigterm_checkpoints_and_the_rerun_resumes_exactly(train, tmp_path):
  """A run stopped by SIGTERM, rerun to step 20, equals a run straight to 20: losses, parameters and
  optimizer state (the recipe's schedule does not depend on train.steps)."""
  common = ["train.checkpoint_every=5", "train.log_every=1", "train.keep_checkpoints=2",
            f"train.workdir={tmp_path / 'b'}"]
  proc = run(train, "train.steps=100000", *common)
  for line in proc.stderr:  # wait until training runs
    if line.startswith("step 3 |"):
      break
  proc.send_signal(signal.SIGTERM)
  start = time.time()
  last = finish(proc, timeout=120).strip().splitlines()[-1]  # "preempted at step N; ..."
  assert time.time() - start < 60
  step = int(re.fullmatch(r"preempted at step (\d+); .*", last).group(1))
  assert 3 <= step < 15
  assert checkpoint.TrainCheckpointer(str(tmp_path / "b" / "checkpoints")).latest_step() == step
  assert [m["step"] for m in read_metrics(tmp_path / "b")] == list(range(1, step + 1))  # each step's metrics on disk

  err = finish(run(train, "train.steps=20", *common))
  assert f"resumed from step {step}" in err  # the state and the data position
  finish(run(train, "train.steps=20", *common[:-1], f"train.workdir={tmp_path / 'a'}"))
  straight, resumed = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
  assert [m["step"] for m in resumed] == list(range(1, 21))
  assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
  kept = sorted(int(d) for d in os.listdir(tmp_path / "b" / "checkpoints") if d.isdigit())
  assert kept == [15, 20]
  a, b = read_state(tmp_path / "a" / "checkpoints" / "20"), read_state(tmp_path / "b" / "checkpoints" / "20")
  assert int(b["step"]) == 20
  for name in ("params", "opt_state"):
    for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name]), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  # Only trainable parameters are stored by default, next to the data iterator's position.
  assert list(b["params"]) == ["projector"] and "frozen" not in b
  assert json.loads((tmp_path / "b" / "checkpoints" / "20" / "data" / "process_0-of-1.json").read_text())


KILL_DURING_SAVE = r"""
import os, signal
import jax, jax.numpy as jnp, numpy as np
from vllm_jax.train import checkpoint, trainer
state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params={{"w": jnp.arange(12.0).reshape(3, 4)}},
                           frozen={{}}, opt_state={{"mu": jnp.ones((3, 4))}}, rng=jnp.zeros((2,), jnp.uint32),
                           nan_skips=jnp.zeros((), jnp.int32))
ckpt = checkpoint.TrainCheckpointer({directory!r})
ckpt.save(1, state)
ckpt.wait()
# A large state so that the second save is still being written when the process dies.
big = state.replace(frozen=dict(ballast=jnp.ones((16, 1024, 1024), jnp.float32)))
ckpt.save_frozen = True
ckpt.save(2, big)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_during_async_save_keeps_previous(tmp_path):
  directory = str(tmp_path / "checkpoints")
  proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.format(directory=directory)], env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  entries = os.listdir(directory)
  assert "1" in entries and "2" not in entries, entries  # step 2 never became a checkpoint
  fresh = trainer.TrainState(step=jnp.full((), 7, jnp.int32), params={"w": jnp.zeros((3, 4))}, frozen={},
                             opt_state={"mu": jnp.zeros((3, 4))}, rng=jnp.ones((2,), jnp.uint32),
                             nan_skips=jnp.zeros((), jnp.int32))
  ckpt = checkpoint.TrainCheckpointer(directory)
  assert ckpt.latest_step() == 1
  state = ckpt.restore(fresh)
  ckpt.close()
  assert int(state.step) == 0
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.arange(12.0).reshape(3, 4))
