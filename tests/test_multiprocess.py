"""Two jax processes on localhost (4 fake CPU devices each) through launch/local.py: the same losses
as one process with 8 devices, and a killed peer makes the survivor fail fast instead of hanging."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import train_tiny

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_spec = importlib.util.spec_from_file_location("launch_local", os.path.join(ROOT, "launch", "local.py"))
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)

ENV = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
TRAIN = [sys.executable, os.path.join(HERE, "train_tiny.py"), "--mesh=2,2,2"]


def test_two_processes_match_one():
  # Every parameter trains: optimizer moments are sharded over fsdp/tensor across both processes.
  steps = {"train.steps": 4, "train.log_every": 4, "optim.trainable": [".*"]}
  procs = local.launch(TRAIN + [f"--config.{k}={json.dumps(v)}" for k, v in steps.items()], num_processes=2,
                       devices_per_process=4, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  lines = [json.loads(line) for line in outputs[0][0].splitlines() if line.startswith("{")]  # gloo prints too
  assert lines[-1] == dict(done=True, preempted=False, step=4)
  multi = [line["loss"] for line in lines[:-1]]

  _, single = train_tiny.run(train_tiny.config(**steps), (2, 2, 2))  # this process: 8 devices
  np.testing.assert_allclose(multi, [m["loss"] for m in single.history], rtol=1e-5)


def test_killed_peer_fails_the_survivor_fast():
  args = ["--sleep_per_step=0.1", "--config.train.steps=100000", "--config.train.log_every=1"]
  procs = local.launch(TRAIN + args, num_processes=2, devices_per_process=4, env=ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    for line in procs[0].stderr:  # process 0 logs; wait until both train
      if line.startswith("step 3 |"):
        break
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    procs[0].communicate(timeout=90)
    elapsed = time.monotonic() - start
    assert procs[0].returncode != 0
    assert elapsed < 60, elapsed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
