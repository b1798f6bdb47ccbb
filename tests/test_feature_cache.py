"""The frozen-feature cache (`vllm-jax cache-features`, `data.feature_cache`): real mp4s (h264 + AAC,
one without sound, one row whose video is missing) in the WebVid layout, a converted tiny model.
Training from the cache gives the losses of training from the videos; a cache made with other
encoder weights, another frame count or other data files is refused, naming what differs; an
interrupted cache write resumes where it stopped and ends as an uninterrupted one."""

import csv
import os
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from test_train_video_llama import CAPTIONS, tiny_video_llama
from test_video_loading import write_video
from vllm_jax import cli
from vllm_jax.cli.cache_features import cache_features
from vllm_jax.configs.video_llama import AUDIO_CONNECTOR, VISION_CONNECTOR, get_config, model_config
from vllm_jax.data import feature_cache
from vllm_jax.models.video_llama import VideoLlama, abstract_params
from vllm_jax.systems import video_llama as vl
from vllm_jax.train import optim, sharding
from vllm_jax.train import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_model(path, config, params, tokenizer):
  vl.VideoLlamaSystem(config, params, tokenizer).save(str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Model folders: `model` (random weights), `other_vit` (its ViT perturbed), `three_frames`
  (its weights, 3 frames per video); a WebVid-style CSV over 8 mp4s (the last without sound)
  and one missing video."""
  root = tmp_path_factory.mktemp("feature_cache")
  config, params, tokenizer = tiny_video_llama(root)
  save_model(root / "model", config, params, tokenizer)
  flat = optim.flatten(params)
  key = "vision/visual_encoder/blocks/attn/query/kernel"
  assert key in flat, sorted(flat)[:8]
  save_model(root / "other_vit", config, optim.unflatten({**flat, key: flat[key] * 1.01}), tokenizer)
  save_model(root / "three_frames", config.replace(num_frames=3), params, tokenizer)

  rows = []
  for i, caption in enumerate(CAPTIONS):
    page = f"{i % 2:03d}"
    os.makedirs(root / "videos" / page, exist_ok=True)
    write_video(root / "videos" / page / f"{1000 + i}.mp4", num_frames=8 + 3 * i, size=(32, 32),
                audio_seconds=None if i == 7 else 1.0)
    rows.append(dict(videoid=1000 + i, name=caption, page_dir=page))
  rows.insert(3, dict(videoid=999, name="missing", page_dir="000"))
  with open(root / "webvid.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, ["videoid", "name", "page_dir"])
    writer.writeheader()
    writer.writerows(rows)
  return root


def train_config(root, model="model", audio=False, **data):
  """tiny_stage1 on the CSV from `root/model`, 6 steps of 8 examples over the 8 fake devices;
  frozen parameters in bfloat16 as the recipes keep them. `audio`: captions with sound, both
  connectors trained."""
  cfg = get_config("tiny_stage1")
  cfg.init_from = str(root / model)
  cfg.data.update({"webvid_csv": str(root / "webvid.csv"), "webvid_dir": str(root / "videos"), "with_audio": audio,
                   **data})
  cfg.train.update(steps=6, log_every=3)
  if audio:
    cfg.optim.trainable = (VISION_CONNECTOR, AUDIO_CONNECTOR)
    cfg.data.max_text_len = 12
  return cfg


def losses(cfg):
  return np.array([m["loss"] for m in run_lib.train(cfg, vl.VideoLlamaSystem).history])


def cache_entries(cache_dir, num_records=9):
  num_chunks = feature_cache.load_meta(cache_dir)["layout"]["chunks"]["captions"]
  files = feature_cache.chunk_files(cache_dir, "captions", num_chunks)
  return [feature_cache.read(files, i) for i in range(num_records)]


def test_cached_path_gives_the_video_branch_tokens():
  """frozen_features then encode_video_features (the cached path) give encode_video's tokens."""
  config = model_config("tiny")
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.1).astype(a.dtype),
                        nn.meta.unbox(abstract_params(config)))
  frames = rng.normal(size=(2, 4, 28, 28, 3)).astype(np.float32)
  mask = np.array([[True, True, True, False], [True] * 4])
  model = VideoLlama(config)
  features, _ = model.apply({"params": params}, frames, method="frozen_features")
  assert features.shape == (2, 4, 8, 32)
  tokens = model.apply({"params": params}, frames, mask, method="encode_video")
  cached = model.apply({"params": params}, features, mask, method="encode_video_features")
  np.testing.assert_allclose(cached, tokens, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("audio", [False, True], ids=["vision", "audio_visual"])
def test_training_from_the_cache_gives_the_same_losses(setup, tmp_path, audio):
  root = setup
  cfg = train_config(root, audio=audio)
  assert cache_features(cfg, str(tmp_path / "cache"), batch_size=4, chunk_size=4, progress=False) == 3
  entries = cache_entries(tmp_path / "cache")
  assert [e["ok"] for e in entries] == [True] * 3 + [False] + [True] * 5 and "999.mp4" in entries[3]["error"]
  assert entries[0]["frame_features"].shape == (4, 8, 32) and entries[0]["frame_features"].dtype == np.float32
  if audio:
    assert [bool(e["audio_valid"]) for e in entries if e["ok"]] == [True] * 7 + [False]
    assert entries[0]["audio_features"].shape == (8, 24)

  cached_cfg = train_config(root, audio=audio, feature_cache=str(tmp_path / "cache"))
  spec = vl.VideoLlamaSystem.batch_spec(cached_cfg, model_config("tiny"))
  assert "frames" not in spec and spec["frame_features"].shape == (8, 4, 8, 32)
  assert ("audio_features" in spec) == audio and "audio" not in spec
  ref, ours = losses(cfg), losses(cached_cfg)
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  print(f"{'audio-visual' if audio else 'vision'} stage 1, cached vs uncached losses: max rel diff {rel:.1e}")
  assert len(ref) == 6 and np.isfinite(ref).all() and rel <= 1e-5
  assert np.abs(np.diff(ref)).max() > 1e-3  # the steps train: equal losses are not one constant


@pytest.mark.parametrize("audio", [False, True], ids=["vision", "audio_visual"])
def test_a_cached_run_keeps_no_encoder_in_its_state(audio):
  """From a cache the loss reads neither the ViT, ln_vision and image Q-Former nor the ImageBind
  encoder: they stay out of the train state (as the trainable connectors and the LLM do not),
  unless train.save_frozen asks checkpoints to hold a whole model."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  cfg = train_config(Path("/unused"), audio=audio, feature_cache="/unused")
  config = vl.VideoLlamaSystem.stage_config(cfg, model_config("tiny"))
  encoders = ("vision/visual_encoder/", "vision/ln_vision/", "vision/qformer/", "audio/encoder/")
  state = lambda t: set(optim.flatten(optim.merge(t.abstract_state.params, t.abstract_state.frozen)))
  model = set(optim.flatten(nn.meta.unbox(vl.VideoLlamaSystem.abstract_params(config))))
  kept = state(run_lib.make_trainer(cfg, mesh, vl.VideoLlamaSystem, config))
  assert kept == {k for k in model if not k.startswith(encoders)} and len(kept) < len(model)
  assert any(k.startswith("audio/") for k in kept) == audio
  cfg.train.save_frozen = True
  assert state(run_lib.make_trainer(cfg, mesh, vl.VideoLlamaSystem, config)) == model
  cfg.train.save_frozen, cfg.data.feature_cache = False, ""  # from frames: every encoder is read
  assert state(run_lib.make_trainer(cfg, mesh, vl.VideoLlamaSystem, config)) == model


def test_a_cache_made_otherwise_is_refused(setup, tmp_path):
  root = setup
  out = str(tmp_path / "cache")
  cache_features(train_config(root), out, batch_size=8, chunk_size=4, progress=False)
  system = vl.VideoLlamaSystem

  def refusal(cfg):
    config, tokenizer_dir = run_lib.model_config(cfg, system)
    with pytest.raises(ValueError) as e:
      system.dataset(cfg, config, tokenizer_dir)
    return str(e.value)

  other = refusal(train_config(root, model="other_vit", feature_cache=out))
  assert "made for other encoder weights than this run's" in other, other
  assert "encoder weights: fingerprint: cache" in other and "preprocessing" not in other, other
  frames = refusal(train_config(root, model="three_frames", feature_cache=out))
  assert "preprocessing: num_frames: cache 4, this run 3" in frames, frames
  assert "feature shapes: frame_features: cache [[4, 8, 32], 'float32'], this run [[3, 8, 32], 'float32']" in frames
  assert "encoder weights" not in frames.splitlines()[0], frames
  dtype = refusal(_with(train_config(root, feature_cache=out), "optim.frozen_dtype", "float32"))
  assert "encoder weights: frozen_dtype: cache bfloat16, this run float32" in dtype, dtype

  shutil.copy(root / "webvid.csv", tmp_path / "copy.csv")
  moved = refusal(train_config(root, feature_cache=out, webvid_csv=str(tmp_path / "copy.csv")))
  assert "dataset files: captions.files." in moved and "copy.csv" in moved, moved

  os.remove(feature_cache.chunk_files(out, "captions", 3)[1])
  assert "is incomplete: 1 of 3 chunks of captions are missing" in refusal(train_config(root, feature_cache=out))
  assert cli.main(["cache-features", "--config", os.path.join(ROOT, "configs/video_llama.py:tiny_stage1"),
                   f"--config.init_from={root / 'three_frames'}", f"--config.data.webvid_csv={root / 'webvid.csv'}",
                   f"--config.data.webvid_dir={root / 'videos'}", "--out", out, "--chunk-size=4"]) == 2


def _with(cfg, key, value):
  *sections, name = key.split(".")
  node = cfg
  for section in sections:
    node = node[section]
  node[name] = value
  return cfg


def test_an_interrupted_cache_write_resumes(setup, tmp_path, monkeypatch):
  """The encoder fails in the second chunk: the first is in the cache, the second not (it was
  written to a temporary file); the rerun writes the other two and the cache equals an uninterrupted one."""
  root = setup
  cfg = train_config(root)
  whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  assert cache_features(cfg, whole, batch_size=2, chunk_size=4, progress=False) == 3

  make_encoder = feature_cache.make_encoder

  def failing(*args):
    encode = make_encoder(*args)
    calls = []

    def encode_until_killed(name, units):
      calls.append(1)
      if len(calls) == 3:  # one call per 2 records (their 8 frames): the second chunk's first
        raise KeyboardInterrupt
      return encode(name, units)
    return encode_until_killed

  monkeypatch.setattr(feature_cache, "make_encoder", failing)
  with pytest.raises(KeyboardInterrupt):
    cache_features(cfg, resumed, batch_size=2, chunk_size=4, progress=False)
  first, second, third = feature_cache.chunk_files(resumed, "captions", 3)
  assert os.path.exists(first) and not os.path.exists(second)
  monkeypatch.undo()
  with pytest.raises(ValueError, match="holds another feature cache"):
    cache_features(_with(train_config(root), "seed", 1), resumed, batch_size=2, chunk_size=4, progress=False)
  mtime = os.stat(first).st_mtime_ns
  assert cache_features(cfg, resumed, batch_size=2, chunk_size=4, progress=False) == 2
  assert os.stat(first).st_mtime_ns == mtime and os.path.exists(third)
  assert cache_features(cfg, resumed, batch_size=2, chunk_size=4, progress=False) == 0
  for a, b in zip(cache_entries(whole), cache_entries(resumed)):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
