"""The frozen-feature cache of Video-LLaVA (image and video towers) and LLaMA-VID (EVA ViT per frame):
LLaVA-style data mixing pngs, mp4s of different lengths, a missing video and text-only
conversations, random tiny model folders. Training from the cache gives the losses of training from
the media; the towers / the ViT stay out of the train state; a cache made otherwise is refused."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from test_video_loading import write_video
from vllm_jax import cli
from vllm_jax.cli.cache_features import cache_features
from vllm_jax.cli.flags import load_config
from vllm_jax.configs import llama_vid as llama_vid_recipes
from vllm_jax.configs import video_llava as video_llava_recipes
from vllm_jax.data import datasets, feature_cache
from vllm_jax.data.tokenizer import train_tokenizer, train_wordpiece_tokenizer
from vllm_jax.systems.llama_vid import LlamaVidSystem
from vllm_jax.systems.video_llava import VideoLlavaSystem
from vllm_jax.train import optim, sharding
from vllm_jax.train import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATS = [("What is shown?", "A grey screen that gets brighter."), ("Is it bright?", "Not at first."),
         ("What colour is it?", "Grey.")]
RECIPES = {"video_llava": "configs/video_llava.py", "llama_vid": "configs/llama_vid.py"}
# The media of each record of data.json, in order (None: a text-only conversation).
MEDIA = ["clip0.mp4", "img0.png", None, "clip1.mp4", "missing.mp4", "img1.png", "clip2.mp4", None]


def item(i, media):
  turns = [{"from": who, "value": text} for q, a in CHATS[:1 + i % 3] for who, text in (("human", q), ("gpt", a))]
  if media is None:
    return {"id": str(i), "conversations": turns}
  kind = "image" if media.endswith(".png") else "video"
  turns[0]["value"] = f"<{kind}>\n" + turns[0]["value"]
  return {"id": str(i), kind: media, "conversations": turns}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """root/media: three mp4s (3, 5 and 7 s at 4 fps), two pngs; root/data.json over them (`MEDIA`);
  a LLaMA tokenizer and a BERT one; root/video_llava and root/llama_vid: random tiny models."""
  root = tmp_path_factory.mktemp("feature_cache_systems")
  media = root / "media"
  media.mkdir()
  for i, seconds in enumerate((3, 5, 7)):
    write_video(media / f"clip{i}.mp4", num_frames=4 * seconds, fps=4, size=(32, 40))
  rng = np.random.default_rng(0)
  for i in range(2):
    Image.fromarray(rng.integers(0, 256, (30, 44, 3), np.uint8)).save(media / f"img{i}.png")
  (root / "data.json").write_text(json.dumps([item(i, m) for i, m in enumerate(MEDIA)]))

  corpus = [text for chat in CHATS for text in chat] + ["USER: ASSISTANT: A chat between a human and an assistant."]
  tokenizer = train_tokenizer(corpus * 20, str(root / "tokenizer"), vocab_size=300)
  bert = train_wordpiece_tokenizer(corpus * 20, str(root / "bert"), vocab_size=200)
  for name, recipes, system in (("video_llava", video_llava_recipes, VideoLlavaSystem),
                                ("llama_vid", llama_vid_recipes, LlamaVidSystem)):
    ids = system.add_media_tokens(tokenizer)
    config = recipes.model_config("tiny").replace(**dict(zip(system.placeholder_fields, ids)))
    inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in system.init_inputs(config).items()}
    params = jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(system.model(config).init)(jax.random.key(1), **inputs)))
    extra = (bert,) if system is LlamaVidSystem else ()
    system(config, params["params"], tokenizer, *extra).save(str(root / name))
  return root


def recipe(root, system, stage, **overrides):
  """The tiny recipe `stage` of `system` on root/data.json from root/<system>, 4 steps of 8
  examples over the 8 fake devices."""
  return load_config(os.path.join(ROOT, f"{RECIPES[system]}:tiny_{stage}"), [
      f"--config.init_from={root / system}", f"--config.data.instruct_json={root / 'data.json'}",
      f"--config.data.instruct_dir={root / 'media'}", "--config.train.steps=4", "--config.train.log_every=2",
      *(f"--config.{k}={v}" for k, v in overrides.items())])


def losses(cfg, system):
  return np.array([m["loss"] for m in run_lib.train(cfg, system).history])


def entries(cache_dir):
  files = feature_cache.chunk_files(cache_dir, "instructions", feature_cache.load_meta(cache_dir)["layout"]["chunks"]
                                    ["instructions"])
  return [feature_cache.read(files, i) for i in range(len(MEDIA))]


def first_batches(cfg, system) -> list[dict]:
  """The batches of a run of `cfg`'s steps."""
  config, tokenizer_dir = run_lib.model_config(cfg, system)
  it = iter(datasets.batches(system.dataset(cfg, config, tokenizer_dir), cfg.train.batch_size))
  return [next(it) for _ in range(cfg.train.steps)]


def media_kinds(cfg) -> list[str]:
  """What each batch of a Video-LLaVA run holds: "image", "video" or "text" (each is drawn from one)."""
  config, _ = run_lib.model_config(cfg, VideoLlavaSystem)
  asks = lambda batch, token_id: (batch["input_ids"] == token_id).any()
  return ["image" if asks(b, config.image_token_id) else "video" if asks(b, config.video_token_id) else "text"
          for b in first_batches(cfg, VideoLlavaSystem)]


def check_same_losses(cfg, cached_cfg, system):
  ref, ours = losses(cfg, system), losses(cached_cfg, system)
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  print(f"{system.model_type}: cached vs uncached losses {ours} / {ref}: max rel diff {rel:.1e}")
  assert len(ref) == 4 and np.isfinite(ref).all() and rel <= 1e-5
  assert np.abs(np.diff(ref)).max() > 1e-3  # the steps differ: equal losses are not one constant


def refusal(cfg, system):
  config, tokenizer_dir = run_lib.model_config(cfg, system)
  with pytest.raises(ValueError) as e:
    system.dataset(cfg, config, tokenizer_dir)
  return str(e.value)


def test_video_llava_trains_from_the_cache_as_from_the_media(files, tmp_path):
  root, out = files, str(tmp_path / "cache")
  cfg = recipe(root, "video_llava", "stage1")
  assert cache_features(cfg, out, batch_size=2, chunk_size=3, progress=False) == 3
  got = entries(out)
  assert [e["ok"] for e in got] == [m != "missing.mp4" for m in MEDIA] and "missing.mp4" in got[4]["error"]
  for e, media in zip(got, MEDIA):
    if media is None or not e["ok"]:
      assert not any(k.endswith("_features") for k in e), e.keys()
    elif media.endswith(".png"):
      assert e["image_features"].shape == (1, 4, 32) and "video_features" not in e and e["is_image"]
    else:
      assert e["video_features"].shape == (1, 4, 5, 32) and e["video_features"].dtype == np.float32
      assert "image_features" not in e and not e["is_image"]

  cached = recipe(root, "video_llava", "stage1", **{"data.feature_cache": out})
  config, _ = run_lib.model_config(cfg, VideoLlavaSystem)
  spec = VideoLlavaSystem.batch_spec(cached, config)
  assert "pixels" not in spec and spec["features"].shape == (8, 4, 5, 32)
  assert media_kinds(cached) == ["image", "video", "video", "text"]
  check_same_losses(cfg, cached, VideoLlavaSystem)

  dtype = refusal(recipe(root, "video_llava", "stage1", **{"data.feature_cache": out,
                                                           "optim.frozen_dtype": "float32"}), VideoLlavaSystem)
  assert "encoder weights: frozen_dtype: cache bfloat16, this run float32" in dtype, dtype


def test_llama_vid_trains_from_the_cache_as_from_the_media(files, tmp_path):
  """Stage 2 (the Q-Former trained, every question read with the frames' cached ViT features),
  the cache made through the command line."""
  root, out = files, str(tmp_path / "cache")
  flags = [f"--config.init_from={root / 'llama_vid'}", f"--config.data.instruct_json={root / 'data.json'}",
           f"--config.data.instruct_dir={root / 'media'}"]
  assert cli.main(["cache-features", "--config", os.path.join(ROOT, "configs/llama_vid.py:tiny_stage2"), *flags,
                   "--out", out, "--batch-size=4", "--chunk-size=5"]) == 0
  got = entries(out)
  assert [e["ok"] for e in got] == [m != "missing.mp4" for m in MEDIA]
  frames = [None if m is None or not e["ok"] else len(e["frame_features"]) for e, m in zip(got, MEDIA)]
  assert frames == [3, 1, None, 4, None, 1, 4, None]  # 1 fps, at most data.max_frames (4)
  assert got[0]["frame_features"].shape == (3, 5, 32) and "frame_features" not in got[2]

  cfg = recipe(root, "llama_vid", "stage2")
  cached = recipe(root, "llama_vid", "stage2", **{"data.feature_cache": out})
  config, _ = run_lib.model_config(cfg, LlamaVidSystem)
  spec = LlamaVidSystem.batch_spec(cached, config)
  assert "pixels" not in spec and spec["frame_features"].shape == (8, 4, 5, 32)
  frames = [int(max(b["num_frames"])) for b in first_batches(cached, LlamaVidSystem)]
  assert frames == [1, 4, 4, 0]  # images (one frame each), videos, text
  check_same_losses(cfg, cached, LlamaVidSystem)

  frames = refusal(recipe(root, "llama_vid", "stage2", **{"data.feature_cache": out, "data.max_frames": 3}),
                   LlamaVidSystem)
  assert "preprocessing: max_frames: cache 4, this run 3" in frames, frames


@pytest.mark.parametrize("system,stages,encoders", [
    (VideoLlavaSystem, ("stage1", "stage2"), ("image_tower/", "video_tower/")),
    (LlamaVidSystem, ("stage1", "stage2", "stage3"), ("vision/",))], ids=["video_llava", "llama_vid"])
def test_a_cached_run_keeps_no_encoder_in_its_state(system, stages, encoders):
  """From a cache the loss reads no tower (Video-LLaVA) / no ViT (LLaMA-VID) in any stage: they
  stay out of the train state, unless train.save_frozen asks for whole-model checkpoints."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  recipes = video_llava_recipes if system is VideoLlavaSystem else llama_vid_recipes
  state = lambda t: set(optim.flatten(optim.merge(t.abstract_state.params, t.abstract_state.frozen)))
  for stage in stages:
    cfg = recipes.get_config(f"tiny_{stage}")
    cfg.data.feature_cache = "/unused"
    if "video_features" in cfg.data:  # LLaMA-VID's stage 3 from video files (its feature files read no ViT)
      cfg.data.video_features = False
    config = run_lib.training_config(cfg, system, recipes.model_config("tiny"))
    model = set(optim.flatten(nn.meta.unbox(system.abstract_params(config))))
    kept = state(run_lib.make_trainer(cfg, mesh, system, config))
    assert kept == {k for k in model if not k.startswith(encoders)} and len(kept) < len(model), stage
    cfg.train.save_frozen = True
    assert state(run_lib.make_trainer(cfg, mesh, system, config)) == model
    cfg.train.save_frozen, cfg.data.feature_cache = False, ""  # from the media: the encoders are read
    assert state(run_lib.make_trainer(cfg, mesh, system, config)) == model


@pytest.mark.parametrize("system,key", [(VideoLlavaSystem, "features"), (LlamaVidSystem, "frame_features")],
                         ids=["video_llava", "llama_vid"])
def test_features_keep_the_encoders_compute_dtype(system, key):
  """Computing in bfloat16 (the full-size recipes), the encoders' outputs are cached and batched in
  bfloat16: exact, and half the bytes of float32 (features.json records the dtype: a cache made
  in another one is refused)."""
  recipes = video_llava_recipes if system is VideoLlavaSystem else llama_vid_recipes
  cfg = recipes.get_config("tiny_stage1")
  cfg.compute_dtype, cfg.data.feature_cache = "bfloat16", "/unused"
  config = run_lib.training_config(cfg, system, recipes.model_config("tiny"))
  assert {np.dtype(dtype).name for _, dtype in system.feature_shapes(cfg, config).values()} == {"bfloat16"}
  assert system.batch_spec(cfg, config)[key].dtype == jnp.bfloat16
