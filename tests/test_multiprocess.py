"""`vllm-jax train` as two jax processes on localhost (4 fake CPU devices each) through
launch/local.py: the same losses as one process with 8 devices, process 0 alone logs, and a killed
peer makes the survivor fail fast instead of hanging. `tiny_run` is the training command the
subprocess tests share."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from vllm_jax import cli
from vllm_jax.data import conversation as conv_lib
from vllm_jax.data.tokenizer import train_tokenizer
from vllm_jax.train.trainer import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_spec = importlib.util.spec_from_file_location("launch_local", os.path.join(ROOT, "launch", "local.py"))
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)

FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
ENV = dict(os.environ, XLA_FLAGS=FAST)


def tiny_run(root) -> list[str]:
  """Eight pngs with LLaVA-style captions and a tokenizer in `root` -> `vllm-jax train` of Video-LLaVA's
  tiny stage 1 on them from a random init (pass train.workdir and the rest). The tokenizer learns
  the conversation template, so the texts fit in 64 tokens."""
  answers = ["A red circle" + " on a blue square" * (i % 3) for i in range(8)]
  corpus = [conv_lib.LLAVA_V1.system, "USER: What is shown? ASSISTANT:", *answers] * 10
  train_tokenizer(corpus, str(root / "tokenizer"), vocab_size=512)
  (root / "media").mkdir()
  rng = np.random.default_rng(0)
  items = []
  for i, answer in enumerate(answers):
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8)).save(root / "media" / f"img{i}.png")
    items.append({"id": str(i), "image": f"img{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": answer}]})
  (root / "train.json").write_text(json.dumps(items))
  return [sys.executable, "-m", "vllm_jax.cli", "train",
          "--config", os.path.join(ROOT, "configs/video_llava.py:tiny_stage1"),
          f"--config.data.tokenizer={root / 'tokenizer'}", f"--config.data.instruct_json={root / 'train.json'}",
          f"--config.data.instruct_dir={root / 'media'}", "--config.model.llama.vocab_size=512",
          "--config.data.max_text_len=64", "--config.data.max_len=80"]


# Every parameter trains: optimizer moments are sharded over fsdp/tensor across both processes.
MULTI = ["--config.optim.trainable=.*", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]


@pytest.fixture(scope="module")
def train(tmp_path_factory):
  """The tiny run's command and an environment whose runs share their compiled steps."""
  root = tmp_path_factory.mktemp("tiny_run")
  env = dict(ENV, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return tiny_run(root) + MULTI, env


def test_two_processes_match_one_and_a_killed_peer_fails_the_survivor_fast(train, tmp_path):
  command, env = train
  args = ["--config.train.steps=100000", "--config.train.log_every=1"]
  procs = local.launch(command + args + [f"--config.train.workdir={tmp_path / 'multi'}"], num_processes=2,
                       devices_per_process=4, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    for line in procs[0].stderr:  # process 0 logs for the job; wait until both train
      if line.startswith("step 4 |"):
        break
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    _, err = procs[0].communicate(timeout=90)
    elapsed = time.monotonic() - start
    assert procs[0].returncode != 0
    assert elapsed < 60, elapsed
    assert "step 1 |" not in procs[1].stderr.read()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()

  # Each step's metrics are on disk before its log line.
  multi = read_metrics(tmp_path / "multi")[:4]
  assert [m["step"] for m in multi] == [1, 2, 3, 4]
  single = ["--config.train.steps=4", "--config.train.log_every=1", f"--config.train.workdir={tmp_path / 'single'}"]
  assert cli.main(command[3:] + single) == 0  # this process: 8 devices
  np.testing.assert_allclose([m["loss"] for m in multi], [m["loss"] for m in read_metrics(tmp_path / "single")], rtol=1e-5)
