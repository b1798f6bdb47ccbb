"""Training checkpoints: exact resume (data order included), kill -9 during an async save, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

import train_tiny
from vllm_jax.train import checkpoint, optim

HERE = os.path.dirname(os.path.abspath(__file__))
# Subprocesses: 1 CPU device; cheaper compiles (values are compared within one process only).
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true", JAX_PLATFORMS="cpu")


def test_resume_is_exact(tmp_path):
  cfg = lambda steps, workdir: train_tiny.config(**{
      "train.steps": steps, "train.workdir": str(workdir), "train.checkpoint_every": 5,
      "train.log_every": 5, "train.keep_checkpoints": 2})
  devices = jax.devices()[:2]
  t, straight = train_tiny.run(cfg(20, tmp_path / "a"), (2, 1, 1), devices=devices)
  _, first = train_tiny.run(cfg(10, tmp_path / "b"), t=t)
  _, second = train_tiny.run(cfg(20, tmp_path / "b"), t=t)  # restores step 10 and the data position

  assert len(first.history) == 10 and len(second.history) == 10
  resumed = [m["loss"] for m in first.history + second.history]
  assert resumed == [m["loss"] for m in straight.history]
  for name, a, b in [("params", straight.state.params, second.state.params),
                     ("opt_state", straight.state.opt_state, second.state.opt_state)]:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  kept = sorted(int(d) for d in os.listdir(tmp_path / "b" / "checkpoints") if d.isdigit())
  assert kept == [15, 20]
  # Only trainable parameters are stored by default, next to the data iterator's position.
  step_dir = tmp_path / "b" / "checkpoints" / "20"
  metadata = (step_dir / "state" / "_METADATA").read_text()
  assert "lm_head" in metadata and "frozen" not in metadata
  assert json.loads((step_dir / "data" / "process_0-of-1.json").read_text())
  restored = checkpoint.TrainCheckpointer(str(tmp_path / "b" / "checkpoints"))
  with jax.threefry_partitionable(False):
    fresh = t.init()
  state = restored.restore(fresh)
  restored.close()
  assert int(state.step) == 20
  np.testing.assert_array_equal(np.asarray(state.params["norm"]["scale"]),
                                np.asarray(second.state.params["norm"]["scale"]))
  assert optim.flatten(state.frozen).keys() == optim.flatten(fresh.frozen).keys()


KILL_DURING_SAVE = r"""
import os, signal, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, {here!r})
from vllm_jax.train import checkpoint, sharding
import train_tiny
t = train_tiny.make_trainer(train_tiny.config(), sharding.make_mesh())
with jax.threefry_partitionable(False):
  state = t.init()
ckpt = checkpoint.TrainCheckpointer({directory!r})
ckpt.save(1, state)
ckpt.wait()
np.save({expected!r}, np.asarray(state.params["lm_head"]["kernel"]))
# A large state so that the second save is still being written when the process dies.
big = state.replace(frozen=dict(state.frozen, ballast=jnp.ones((16, 1024, 1024), jnp.float32)))
ckpt.save_frozen = True
ckpt.save(2, big)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_during_async_save_keeps_previous(tmp_path):
  directory = str(tmp_path / "checkpoints")
  expected = str(tmp_path / "lm_head.npy")
  script = KILL_DURING_SAVE.format(here=HERE, directory=directory, expected=expected)
  proc = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=HERE, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  entries = os.listdir(directory)
  assert "1" in entries and "2" not in entries, entries  # step 2 never became a checkpoint
  t = train_tiny.make_trainer(train_tiny.config(), train_tiny.sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  with jax.threefry_partitionable(False):
    fresh = t.init()
  ckpt = checkpoint.TrainCheckpointer(directory)
  assert ckpt.latest_step() == 1
  state = ckpt.restore(fresh)
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(state.params["lm_head"]["kernel"]), np.load(expected))


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
  cmd = [sys.executable, os.path.join(HERE, "train_tiny.py"), "--sleep_per_step=0.2",
         "--config.train.steps=1000", "--config.train.log_every=1", "--config.train.checkpoint_every=1000",
         f"--config.train.workdir={tmp_path}"]
  proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stderr:  # wait until training runs
    if line.startswith("step 3 |"):
      break
  proc.send_signal(signal.SIGTERM)
  start = time.time()
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert time.time() - start < 60
  done = json.loads(out.strip().splitlines()[-1])
  assert done["preempted"] and 3 <= done["step"] < 1000
  assert checkpoint.TrainCheckpointer(str(tmp_path / "checkpoints")).latest_step() == done["step"]
