"""gs:// for everything a pod run touches, against a local Cloud Storage emulator (`gcs` in
conftest): a training run whose workdir, tokenizer, annotations and media are in a bucket, SIGKILLed
after a checkpoint and resumed there with the uninterrupted run's losses; two processes
checkpointing to a bucket; export to a bucket, then chat and infer on the exported model; a feature
cache made in a bucket and trained from in another working folder; storage that cannot be reached
or read ends in one `error:` line. Commands run as users type them, each from a working folder of
its own that must never get a folder named `gs:`."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_feature_cache import setup  # noqa: F401  (the fixture)
from test_multiprocess import ENV, MULTI, ROOT, local, tiny_run
from vllm_jax import paths
from vllm_jax.train.trainer import read_metrics

CLI = [sys.executable, "-m", "vllm_jax.cli"]


def run(args, cwd, env=None, timeout=600):
  """`vllm-jax ARGS` from the folder `cwd`; checks that no local `gs:` folder appeared there."""
  os.makedirs(cwd, exist_ok=True)
  done = subprocess.run(CLI + args, cwd=cwd, env=env or dict(os.environ), capture_output=True, text=True,
                        timeout=timeout)
  assert not os.path.exists(os.path.join(cwd, "gs:")), os.listdir(cwd)
  return done


def committed_steps(checkpoints: str) -> list[int]:
  """The checkpoint steps orbax has finished writing to a bucket (a step's commit_success.txt is its
  last object)."""
  if not paths.is_dir(checkpoints):
    return []
  return sorted(int(name) for name in paths.listdir(checkpoints)
                if name.isdigit() and paths.exists(paths.join(checkpoints, name, "commit_success.txt")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gcs):
  """Video-LLaVA's tiny stage 1 (`test_multiprocess.tiny_run`) with its tokenizer, annotations and
  images copied to a bucket: (command reading them from the bucket, environment, the bucket, the
  uninterrupted local run's per-step metrics over 12 steps)."""
  root = tmp_path_factory.mktemp("gcs_tiny")
  command = tiny_run(root) + MULTI
  bucket = gcs("tiny-data")
  for name in ("tokenizer", "media", "train.json"):
    paths.copy_tree(str(root / name), f"{bucket}/{name}")
  env = dict(os.environ, XLA_FLAGS=ENV["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8",
             JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  from_bucket = command + [f"--config.data.tokenizer={bucket}/tokenizer",
                           f"--config.data.instruct_json={bucket}/train.json",
                           f"--config.data.instruct_dir={bucket}/media"]
  reference = run(command[3:] + ["--config.train.steps=12", "--config.train.log_every=1",
                                 "--config.train.workdir=reference"], root / "work", env)
  assert reference.returncode == 0, reference.stderr[-3000:]
  return from_bucket, env, bucket, read_metrics(root / "work" / "reference")


def test_a_run_in_a_bucket_survives_sigkill_and_exports(tiny, gcs, tmp_path):
  command, env, data, reference = tiny
  bucket = gcs("resume")
  workdir = f"{bucket}/run"
  train = command[3:] + [f"--config.train.workdir={workdir}", "--config.train.log_every=1",
                         "--config.train.checkpoint_every=3", "--config.train.keep_checkpoints=2",
                         "--config.train.save_frozen=true"]
  # Killed without warning once a checkpoint is committed in the bucket.
  proc = subprocess.Popen(CLI + train + ["--config.train.steps=100000"], cwd=tmp_path, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stderr:
      if line.startswith("step ") and committed_steps(f"{workdir}/checkpoints"):
        break
    else:
      pytest.fail(f"the run ended before a committed checkpoint: {proc.wait()}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  killed_at = committed_steps(f"{workdir}/checkpoints")[-1]
  steps = killed_at + 3  # a few more than the checkpoint holds
  assert steps <= len(reference), f"the killed run got to step {killed_at} before the test saw a checkpoint"

  resumed = run(train + [f"--config.train.steps={steps}"], tmp_path, env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {killed_at}" in resumed.stderr
  ours = read_metrics(workdir)
  assert [m["step"] for m in ours] == list(range(1, steps + 1))
  np.testing.assert_array_equal([m["loss"] for m in ours], [m["loss"] for m in reference[:steps]])
  assert committed_steps(f"{workdir}/checkpoints") == [killed_at, steps]  # keep_checkpoints prunes the bucket
  assert paths.exists(f"{workdir}/run.json") and paths.listdir(f"{workdir}/tensorboard")
  assert not os.path.exists(tmp_path / "gs:")

  exported = f"{bucket}/exported"
  done = run(["export", "--workdir", workdir, "--out", exported], tmp_path, env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"wrote model folder {exported}" in done.stdout
  chat = run(["chat", "--model", exported, "--image", f"{data}/media/img0.png", "--question", "What is shown?",
              "--max-new-tokens", "4"], tmp_path / "elsewhere", env)
  assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-3000:]
  # Questions, their media and the answers in the bucket too (media paths start from the file's folder).
  paths.write_text(f"{data}/questions.jsonl", '{"image": "media/img1.png", "question": "What is shown?"}\n')
  infer = run(["infer", "--model", exported, "--input", f"{data}/questions.jsonl", "--output",
               f"{bucket}/answers.jsonl", "--max-new-tokens", "4"], tmp_path / "elsewhere", env)
  assert infer.returncode == 0, infer.stderr[-3000:]
  assert "answer" in json.loads(paths.read_text(f"{bucket}/answers.jsonl"))


def test_two_processes_checkpoint_to_a_bucket(tiny, gcs, tmp_path):
  command, env, _, reference = tiny
  workdir = f"{gcs('multi')}/run"
  procs = local.launch(command + ["--config.train.steps=4", "--config.train.log_every=1",
                                  "--config.train.checkpoint_every=2", f"--config.train.workdir={workdir}"],
                       num_processes=2, devices_per_process=4, env=env, cwd=tmp_path,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    errors = [p.communicate(timeout=600)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
  assert committed_steps(f"{workdir}/checkpoints") == [2, 4]
  multi = read_metrics(workdir)
  assert [m["step"] for m in multi] == [1, 2, 3, 4]
  np.testing.assert_allclose([m["loss"] for m in multi], [m["loss"] for m in reference[:4]], rtol=1e-5)
  assert not os.path.exists(tmp_path / "gs:")


def test_a_feature_cache_in_a_bucket_trains_from_another_folder(setup, gcs, tmp_path):  # noqa: F811
  from test_feature_cache import losses, train_config
  bucket = gcs("cache")
  for name in ("model", "videos", "webvid.csv"):
    paths.copy_tree(str(setup / name), f"{bucket}/{name}")
  recipe = ["--config", os.path.join(ROOT, "configs/video_llama.py:tiny_stage1"), f"--config.init_from={bucket}/model",
            f"--config.data.webvid_csv={bucket}/webvid.csv", f"--config.data.webvid_dir={bucket}/videos",
            "--config.data.with_audio=false"]
  made = run(["cache-features", *recipe, "--out", f"{bucket}/cache", "--chunk-size=4"], tmp_path / "a")
  assert made.returncode == 0, made.stderr[-3000:]
  assert "written to gs://cache/cache" in made.stdout + made.stderr
  assert paths.exists(f"{bucket}/cache/features.json")

  trained = run(["train", *recipe, f"--config.data.feature_cache={bucket}/cache", "--config.train.steps=6",
                 "--config.train.log_every=1", "--config.train.workdir=run"], tmp_path / "b")
  assert trained.returncode == 0, trained.stderr[-3000:]
  ours = [m["loss"] for m in read_metrics(tmp_path / "b" / "run")]
  ref = losses(train_config(setup))
  np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_storage_that_cannot_be_read_is_one_error_line(tiny, gcs, tmp_path):
  command, env, data, _ = tiny

  def one_error(done, *words):
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith("error:"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and all(w in lines[-1] for w in words), lines[-1]

  one_error(run(["chat", "--model", "gs://no-such-bucket/model", "--question", "hi"], tmp_path, env),
            "gs://no-such-bucket")
  one_error(run(["chat", "--model", f"{data}/no-model", "--question", "hi"], tmp_path, env), f"{data}/no-model")
  # A media folder that is not there, before anything loads; one without the images: the first
  # one named (before the model loads too), not thousands of skip lines.
  one_error(run(command[3:] + [f"--config.data.instruct_dir={data}/nothing-here"], tmp_path, env),
            f"--config.data.instruct_dir={data}/nothing-here: no such folder")
  missing = run(command[3:] + [f"--config.data.instruct_dir={data}/tokenizer", "--config.train.steps=2"],
                tmp_path, env)
  one_error(missing, f"{data}/tokenizer/img")
  assert missing.stderr.count("skipping unreadable") <= 20
  # No emulator where the client looks: one line naming the path, after the client's retries.
  start = time.monotonic()
  unreachable = run(["chat", "--model", "gs://bucket/model", "--question", "hi"], tmp_path,
                    dict(env, STORAGE_EMULATOR_HOST="http://127.0.0.1:9"), timeout=300)
  one_error(unreachable, "gs://bucket/model")
  print(f"unreachable storage reported in {time.monotonic() - start:.0f} s")
