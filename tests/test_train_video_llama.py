"""Video-LLaMA training through `vllm-jax train`: real mp4s (h264 + AAC, written with PyAV) in the
WebVid layout, decoded by decord; a converted tiny model folder as the starting point. A (2, 2, 2)
mesh on 8 devices gives the losses of one device; frozen parameters stay bit-identical; a rerun
resumes from the checkpoint, data position included."""

import csv
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from test_video_loading import write_video
from vllm_jax import cli
from vllm_jax.configs.video_llama import VISION_CONNECTOR, model_config
from vllm_jax.data import conversation as C
from vllm_jax.data.audio import AudioClipConfig
from vllm_jax.data.tokenizer import train_tokenizer
from vllm_jax.models.video_llama import abstract_params
from vllm_jax.train import optim
from vllm_jax.train.trainer import read_metrics
from vllm_jax.systems import video_llama as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
CAPTIONS = ["a red circle moves to the left", "a dog runs on the beach at sunset", "two people talk in a kitchen",
            "waves crash on rocks", "a car drives down an empty road", "snow falls over a quiet town",
            "a cat sleeps on a sofa", "fireworks light up the night sky over the river and the old bridge"]


def tiny_video_llama(root):
  """-> (config, random params, tokenizer trained on CAPTIONS in root/tokenizer with the placeholders)."""
  tokenizer = train_tokenizer(CAPTIONS * 10, str(root / "tokenizer"), vocab_size=300)
  video_id, audio_id = C.add_media_tokens(tokenizer)
  config = model_config("tiny").replace(video_token_id=video_id, audio_token_id=audio_id)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.1).astype(a.dtype),
                        nn.meta.unbox(abstract_params(config)))
  return config, params, tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny Video-LLaMA folder (random weights, trained tokenizer) and a WebVid-style CSV over
  8 mp4s with sound, plus one row whose video is missing."""
  root = tmp_path_factory.mktemp("train_vl")
  config, params, tokenizer = tiny_video_llama(root)
  train_lib.VideoLlamaSystem(config, params, tokenizer).save(str(root / "model"))

  videos = root / "videos"
  rows = []
  for i, caption in enumerate(CAPTIONS):
    page = f"{i % 2:03d}"
    os.makedirs(videos / page, exist_ok=True)
    write_video(videos / page / f"{1000 + i}.mp4", num_frames=8 + 3 * i, size=(32, 32), audio_seconds=1.0)
    rows.append(dict(videoid=1000 + i, name=caption, page_dir=page))
  rows.append(dict(videoid=999, name="missing", page_dir="000"))
  with open(root / "webvid.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, ["videoid", "name", "page_dir"])
    writer.writeheader()
    writer.writerows(rows)
  return root, config, params


def train(root, workdir, mesh, steps, devices, cache):
  """`vllm-jax train` in a process with `devices` CPU devices; compiled steps are cached in `cache`
  (the resumed run reuses the first one's). -> its stderr."""
  args = [sys.executable, "-m", "vllm_jax.cli", "train",
          "--config", os.path.join(ROOT, "configs/video_llama.py:tiny_stage1"),
          f"--config.init_from={root / 'model'}", f"--config.data.webvid_csv={root / 'webvid.csv'}",
          f"--config.data.webvid_dir={root / 'videos'}", f"--config.train.workdir={workdir}",
          f"--config.train.steps={steps}", "--config.train.log_every=5", "--config.train.save_frozen=true",
          "--config.optim.frozen_dtype=float32",
          *(f"--config.mesh.{axis}={n}" for axis, n in zip(("data", "fsdp", "tensor"), mesh))]
  env = dict(os.environ, XLA_FLAGS=f"{FAST} --xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def test_decode_caption_and_conversation_examples(setup):
  root, config, _ = setup
  common = dict(tokenizer_dir=str(root / "model" / "tokenizer"), seq_len=1 + 4 + 8 + 6, max_text_len=6,
                num_frames=4, image_size=28, num_video_tokens=4, num_audio_tokens=8, sampling="uniform",
                train_crop=False)
  video = str(root / "videos" / "001" / "1007.mp4")
  caption = train_lib.Decode(stage=1, audio=None, **common)({"media": video, "caption": CAPTIONS[7]})
  ids, labels = caption["input_ids"], caption["labels"]
  assert ids.shape == labels.shape == caption["attention_mask"].shape == (19,)
  assert caption["frames"].shape == (4, 28, 28, 3) and caption["frame_mask"].all() and "audio" not in caption
  assert ids[0] == 1 and (ids[1:5] == config.video_token_id).all()
  assert (labels[:5] == -100).all() and (labels[5:11] == ids[5:11]).all()  # the caption, cut at 6 tokens
  assert (ids[11:] == 0).all() and (labels[11:] == -100).all() and caption["attention_mask"].sum() == 11

  clips = AudioClipConfig(num_mel_bins=128, num_frames=204)
  record = {"media": video, "conversation": [{"from": "human", "value": "<video>\nWhat happens?"},
                                             {"from": "gpt", "value": "Fireworks."}]}
  chat = train_lib.Decode(stage=2, audio=clips, **dict(common, seq_len=400, max_text_len=400))(record)
  ids, labels = chat["input_ids"], chat["labels"]
  assert chat["audio"].shape == (8, 1, 128, 204) and np.abs(chat["audio"]).sum() > 0
  assert (ids == config.audio_token_id).sum() == 8 and (ids == config.video_token_id).sum() == 4
  tokenizer = train_lib.VideoLlamaSystem.training_tokenizer(common["tokenizer_dir"])
  learned = tokenizer.decode(labels[labels >= 0])
  assert "Assistant: Fireworks." in learned and "What happens" not in learned and "<video>" not in \
      tokenizer.decode(ids[ids < config.video_token_id])


def test_cli_rejects_unknown_fields(capsys):
  spec = os.path.join(ROOT, "configs/video_llama.py:tiny_stage1")
  assert cli.main(["train", "--config", spec, "--config.train.stepz=3"]) == 2
  assert "no field train.stepz; did you mean train.steps?" in capsys.readouterr().err
  assert cli.main(["train", "--config", spec, "--config.train.steps=many"]) == 2
  cfg = cli.load_config(spec, ["--config.train.steps=7", "--config.data.with_audio=true",
                               "--config.optim.trainable=^a/,^b/"])
  assert (cfg.train.steps, cfg.data.with_audio, cfg.optim.trainable) == (7, True, ("^a/", "^b/"))


def test_sharded_stage1_matches_single_device_and_resumes(setup, tmp_path):
  """20 stage-1 steps on a (data 2, fsdp 2, tensor 2) mesh == one device doing 10 steps, then
  10 more in a rerun that resumes from its checkpoint."""
  root, config, params = setup
  cache = tmp_path / "cache"
  sharded = train(root, tmp_path / "sharded", (2, 2, 2), 20, devices=8, cache=cache)
  assert "step 20 | loss" in sharded and "| skipped " in sharded  # the missing video, stepped over
  train(root, tmp_path / "single", (1, 1, 1), 10, devices=1, cache=cache)
  resumed = train(root, tmp_path / "single", (1, 1, 1), 20, devices=1, cache=cache)
  assert "resumed from step 10" in resumed and "step 15 | loss" in resumed

  ours, ref = read_metrics(tmp_path / "sharded"), read_metrics(tmp_path / "single")
  assert [m["step"] for m in ours] == [m["step"] for m in ref] == list(range(1, 21))
  loss, ref_loss = np.array([m["loss"] for m in ours]), np.array([m["loss"] for m in ref])
  rel = np.abs(loss - ref_loss).max() / np.abs(ref_loss).max()
  print(f"stage-1 losses, (2, 2, 2) mesh vs one device: max rel diff {rel:.1e}")
  assert rel <= 1e-5 and np.isfinite(loss).all()

  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(str(tmp_path / "sharded" / "checkpoints" / "20" / "state"))
  trainable, frozen = optim.partition(params, (VISION_CONNECTOR,))
  assert set(optim.flatten(state["params"])) == set(optim.flatten(trainable))
  for k, v in optim.flatten(state["frozen"]).items():
    assert v.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(v), optim.flatten(frozen)[k], err_msg=k)
  for k, v in optim.flatten(state["params"]).items():
    assert not np.array_equal(np.asarray(v), optim.flatten(trainable)[k]), k
