"""Video-LLaVA against transformers' VideoLlavaForConditionalGeneration (random init, fp32), its
converters in both layouts (transformers and the original LanguageBind one), and its configs."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from vllm_jax import generate as gen
from vllm_jax.configs import video_llava as recipes
from vllm_jax.converters import video_llava as conv
from vllm_jax.converters.core import CheckpointMismatchError, DictReader, expected_source_shapes, export
from vllm_jax.models.video_llava import VideoLlava, VideoLlavaConfig, abstract_params
from vllm_jax.train import optim

VOCAB, IMAGE_ID, VIDEO_ID = 128, 126, 127
FRAMES, GRID = 4, 2                 # 28 px images, patch 14
IMAGE_TOKENS, VIDEO_TOKENS = GRID * GRID, FRAMES * (GRID * GRID + 1)


def hf_config() -> T.VideoLlavaConfig:
  vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=14)
  text = T.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=None, pad_token_id=0)
  return T.VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                            video_token_index=VIDEO_ID, image_seq_length=IMAGE_TOKENS,
                            video_seq_length=VIDEO_TOKENS)


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def prompt(rng, media_id: int, count: int) -> list[int]:
  """BOS, text, one media run, text (ids clear of the placeholders)."""
  text = lambda n: rng.integers(3, VOCAB - 2, n).tolist()
  return [1] + text(5) + [media_id] * count + text(7)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """An HF model (weights larger than its default init, for logits far from uniform) saved in
  several shards and read back with `load_hf`; one image, one video (channels-last copies for us)."""
  torch.manual_seed(0)
  hf = T.VideoLlavaForConditionalGeneration(hf_config()).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if p.ndim == 2 and ("language_model" in name or "projector" in name or "lm_head" in name):
        torch.nn.init.normal_(p, std=0.2)
  path = str(tmp_path_factory.mktemp("video_llava") / "hf")
  hf.save_pretrained(path, max_shard_size="100KB")
  config, params = conv.load_hf(path, progress=False)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(28, 28, 3)).astype(np.float32)
  video = rng.normal(size=(FRAMES, 28, 28, 3)).astype(np.float32)
  return hf, path, config, jax.tree.map(jnp.asarray, params), image, video


def torch_images(images: np.ndarray) -> torch.Tensor:
  """[..., H, W, 3] -> [..., 3, H, W]."""
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, -3)))


def forward(config, params, ids, images=None, videos=None, mask=None):
  return jax.jit(VideoLlava(config).apply)({"params": params}, ids, images, videos, mask)[0]


def test_load_hf_reads_sharded_folder_and_config(setup):
  _, path, config, _, _, _ = setup
  assert sum(name.endswith(".safetensors") for name in os.listdir(path)) > 1
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  assert config.image_tower == config.video_tower and config.image_tower.depth == 2  # 3 layers, feature layer -2
  assert config.image_tower.activation == "quick_gelu" and config.image_tower.pre_norm
  assert (config.image_token_id, config.video_token_id, config.num_frames) == (IMAGE_ID, VIDEO_ID, FRAMES)
  assert (config.num_image_tokens, config.num_video_tokens) == (IMAGE_TOKENS, VIDEO_TOKENS)


@pytest.mark.parametrize("media", ["image", "video"])
def test_logits_match_transformers(setup, media):
  hf, _, config, params, image, video = setup
  rng = np.random.default_rng(1)
  if media == "image":
    ids = np.asarray([prompt(rng, IMAGE_ID, IMAGE_TOKENS)])
    ours = forward(config, params, ids, images=image[None])
    kwargs = dict(pixel_values=torch_images(image[None]))
  else:
    ids = np.asarray([prompt(rng, VIDEO_ID, VIDEO_TOKENS)])
    ours = forward(config, params, ids, videos=video[None])
    kwargs = dict(pixel_values_videos=torch_images(video[None]))
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids), **kwargs).logits.numpy()
  err = rel_err(ours, ref)
  print(f"video-llava {media} logits: max rel err {err:.2e}")
  assert err <= 1e-4


def test_batch_mixing_an_image_row_and_a_video_row(setup):
  """Left-padded rows of different lengths: the image row ignores the batch's video and the video
  row its image. transformers' forward counts positions from the padding; pass it ours."""
  hf, _, config, params, image, video = setup
  rng = np.random.default_rng(2)
  rows = [prompt(rng, IMAGE_ID, IMAGE_TOKENS), prompt(rng, VIDEO_ID, VIDEO_TOKENS)]
  length = max(map(len, rows))
  ids = np.asarray([[0] * (length - len(r)) + r for r in rows])
  mask = (np.arange(length)[None] >= length - np.asarray([len(r) for r in rows])[:, None]).astype(np.int32)
  images = np.stack([image, np.zeros_like(image)])
  videos = np.stack([np.zeros_like(video), video])
  ours = np.asarray(forward(config, params, ids, images, videos, mask))
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             position_ids=torch.from_numpy(positions), pixel_values=torch_images(image[None]),
             pixel_values_videos=torch_images(video[None])).logits.numpy()
  valid = mask.astype(bool)
  err = rel_err(ours[valid], ref[valid])
  print(f"video-llava mixed batch logits: max rel err {err:.2e}")
  assert err <= 1e-4
  alone = forward(config, params, np.asarray([rows[0]]), images=image[None])
  np.testing.assert_allclose(ours[0, -len(rows[0]):], np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("media", ["image", "video"])
def test_greedy_generation_matches_transformers(setup, media):
  hf, _, config, params, image, video = setup
  rng = np.random.default_rng(3)
  model = VideoLlava(config)
  if media == "image":
    ids = np.asarray([prompt(rng, IMAGE_ID, IMAGE_TOKENS)])
    tokens = model.apply({"params": params}, image[None], method="encode_images")
    embeds = model.apply({"params": params}, ids, tokens, None, method="embed")
    kwargs = dict(pixel_values=torch_images(image[None]))
  else:
    ids = np.asarray([prompt(rng, VIDEO_ID, VIDEO_TOKENS)])
    tokens = model.apply({"params": params}, video[None], method="encode_videos")
    assert tokens.shape == (1, VIDEO_TOKENS, config.llama.hidden_size)
    embeds = model.apply({"params": params}, ids, None, tokens, method="embed")
    kwargs = dict(pixel_values_videos=torch_images(video[None]))
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                      max_new_tokens=24, do_sample=False, pad_token_id=0, **kwargs)[:, ids.shape[1]:].numpy()
  out = gen.generate(config.llama, params["llm"], inputs_embeds=embeds, max_new_tokens=24)
  assert ref.shape == (1, 24)
  np.testing.assert_array_equal(out.tokens, ref)


def test_save_hf_round_trip_through_from_pretrained(setup, tmp_path):
  hf, path, config, params, image, _ = setup
  out = str(tmp_path / "exported")
  conv.save_hf(config, jax.tree.map(np.asarray, params), out, max_shard_bytes=64 << 10)
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  back, info = T.VideoLlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  unused = re.compile(r"model\.(image|video)_tower\.(encoder\.layers\.2\.|post_layernorm\.).*")
  assert info["missing_keys"] and all(unused.fullmatch(k) for k in info["missing_keys"]), info
  assert not info["unexpected_keys"] and not info["mismatched_keys"], info
  ref_state, got_state = hf.state_dict(), back.state_dict()
  for key in ref_state:
    if not unused.fullmatch(key):
      assert torch.equal(ref_state[key], got_state[key]), key
  ids = torch.from_numpy(np.asarray([prompt(np.random.default_rng(4), IMAGE_ID, IMAGE_TOKENS)]))
  with torch.no_grad():
    want = hf(input_ids=ids, pixel_values=torch_images(image[None])).logits
    got = back.eval()(input_ids=ids, pixel_values=torch_images(image[None])).logits
  torch.testing.assert_close(got, want, rtol=0, atol=0)
  # And read back by us: the same config and arrays.
  config2, params2 = conv.load_hf(out, progress=False)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def test_reads_every_transformers_layout(setup):
  """The names moved between transformers versions; each layout reads to the same arrays."""
  hf, _, config, params, _, _ = setup
  state = {k: v.numpy() for k, v in hf.state_dict().items()}  # transformers 5's own names
  assert conv.detect_layout(state) is conv.TRANSFORMERS5
  for layout in conv.LAYOUTS.values():
    exported = dict(export(jax.tree.map(np.asarray, params), conv.rules(config, layout)))
    assert conv.detect_layout(exported) is layout
    got = conv.convert_checkpoint(DictReader(exported), config, progress=False)
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))
  got = conv.convert_checkpoint(DictReader(state), config, progress=False)
  jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))


def test_converter_names_dropped_extra_and_misshaped_keys(setup):
  hf, _, config, _, _, _ = setup
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  del state["model.video_tower.encoder.layers.1.self_attn.k_proj.weight"]
  state["model.multi_modal_projector.linear_3.weight"] = np.zeros((4, 4), np.float32)
  state["model.language_model.layers.0.mlp.up_proj.weight"] = np.zeros((95, 48), np.float32)
  with pytest.raises(CheckpointMismatchError) as err:
    conv.convert_checkpoint(DictReader(state), config, progress=False)
  message = str(err.value)
  assert "missing keys (1): model.video_tower.encoder.layers.1.self_attn.k_proj.weight" in message
  assert "unexpected keys (1): model.multi_modal_projector.linear_3.weight" in message
  assert ("shape mismatch for model.language_model.layers.0.mlp.up_proj.weight: checkpoint has [95, 48], "
          "model expects [96, 48]") in message


def original_config() -> VideoLlavaConfig:
  config = recipes.model_config("tiny")
  return config.replace(video_tower=config.video_tower.replace(temporal_frames=config.num_frames))


def test_original_round_trip_is_identical(tmp_path):
  config = original_config()
  size = config.image_tower.image_size
  params = jax.jit(VideoLlava(config).init)(
      jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, size, size, 3)),
      jnp.zeros((1, config.num_frames, size, size, 3)))["params"]
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  out = str(tmp_path / "original")
  conv.save_original(config, params, out, max_shard_bytes=32 << 10)
  assert sum(name.endswith(".safetensors") for name in os.listdir(out)) > 1
  back = conv.load_original(out, config, progress=False)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  keys = dict(export(params, conv.rules(config, conv.ORIGINAL)))
  assert keys["model.video_tower.video_tower.encoder.layers.1.temporal_embedding"].shape == (1, config.num_frames, 32)
  assert keys["model.mm_projector.0.weight"].shape == (40, 32) and "model.mm_projector.2.bias" in keys
  assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
  assert not any("temporal" in k for k in keys if k.startswith("model.image_tower."))


def test_original_tower_keys_load_into_languagebind():
  """The original video tower's keys (prefix `model.video_tower.video_tower.`) are exactly those of
  LanguageBind's vision transformer, less the layers past the feature layer and post_layernorm."""
  from test_clip_vit import languagebind_video, languagebind_vision_config
  lb_config, lb_model = languagebind_video()
  config = original_config()
  lb = lb_model.CLIPVisionTransformer(languagebind_vision_config(lb_config, config.video_tower, 3))
  prefix = "model.video_tower.video_tower."
  ours = {k[len(prefix):]: v for k, v in expected_source_shapes(
      conv.rules(config, conv.ORIGINAL), nn.meta.unbox(abstract_params(config))).items() if k.startswith(prefix)}
  theirs = {k: tuple(v.shape) for k, v in lb.state_dict().items()}
  unused = [re.compile(p) for p in conv.unused(config, conv.ORIGINAL, [prefix + k for k in theirs])]
  kept = {k: s for k, s in theirs.items() if not any(p.fullmatch(prefix + k) for p in unused)}
  assert ours == kept
  assert any("temporal_attn" in k for k in ours) and len(theirs) > len(kept)


def test_7b_keys_and_shapes_match_transformers_on_meta():
  """Every key of the 7B -hf model at full size (built on the meta device, no memory), less the
  towers' last layer and post_layernorm, with our expected shapes (from eval_shape)."""
  text = T.LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
  hf_cfg = T.VideoLlavaConfig(text_config=text)
  with torch.device("meta"):
    hf = T.VideoLlavaForConditionalGeneration(hf_cfg)
  theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
  config = recipes.model_config("7b")
  assert conv.config_from_hf(hf_cfg.to_dict()) == config
  ours = expected_source_shapes(conv.rules(config, conv.TRANSFORMERS5), nn.meta.unbox(abstract_params(config)))
  unused = re.compile(r"model\.(image|video)_tower\.(encoder\.layers\.23\.|post_layernorm\.).*")
  missing = {k for k in theirs if not unused.fullmatch(k)} - set(ours)
  assert not missing and not set(ours) - set(theirs)
  assert {k: theirs[k] for k in ours} == ours
  assert sorted(k for k in theirs if unused.fullmatch(k)) == sorted(
      f"model.{t}_tower.{n}" for t in ("image", "video") for n in
      [f"encoder.layers.23.{m}" for m in ("self_attn.k_proj.weight", "self_attn.k_proj.bias",
                                          "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                                          "self_attn.q_proj.weight", "self_attn.q_proj.bias",
                                          "self_attn.out_proj.weight", "self_attn.out_proj.bias",
                                          "layer_norm1.weight", "layer_norm1.bias", "mlp.fc1.weight",
                                          "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                                          "layer_norm2.weight", "layer_norm2.bias")]
      + ["post_layernorm.weight", "post_layernorm.bias"])
  assert sum(np.prod(s) for s in ours.values()) > 7e9


def test_config_round_trip_and_validation():
  config = recipes.model_config("7b")
  assert (config.num_image_tokens, config.num_video_tokens) == (256, 2056)
  assert config.image_tower.depth == 23 and config.llama.vocab_size == 32064
  assert conv.config_from_hf(conv.config_to_hf(config)) == config
  assert VideoLlavaConfig.from_dict(recipes.get_config("7b").model.to_dict()) == config
  # transformers 4 wrote sub-configs as differences from the defaults (as in the -hf config.json).
  sparse = {"text_config": {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                            "vocab_size": 32064, "pad_token_id": 0},
            "vision_config": {"hidden_size": 1024, "image_size": 224, "intermediate_size": 4096,
                              "model_type": "clip_vision_model", "num_attention_heads": 16,
                              "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
            "video_seq_length": 2056}
  assert conv.config_from_hf(sparse) == config.replace(llama=config.llama.replace(pad_token_id=0))
  with pytest.raises(ValueError, match="temporal_frames 4 must be 0 or num_frames 8"):
    config.replace(video_tower=config.video_tower.replace(temporal_frames=4))
  with pytest.raises(ValueError, match="image_tower.width 1024 != video_tower.width 768"):
    config.replace(video_tower=config.video_tower.replace(width=768, num_heads=12))
  with pytest.raises(ValueError, match="one vision config for both towers"):
    conv.config_to_hf(recipes.model_config("7b-original"))


def test_training_recipes_select_the_stage_parameters():
  paths = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in
           jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params(recipes.model_config("tiny"))))[0]]
  for stage, lr, batch, prefixes in (("stage1", 1e-3, 256, {"projector"}), ("stage2", 2e-5, 128, {"projector", "llm"})):
    cfg = recipes.get_config(stage)
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.optim.weight_decay, cfg.optim.min_lr) == (lr, batch, 0.0, 0.0)
    warmup, total = optim.schedule_steps(cfg.optim, cfg.train.steps)
    assert cfg.optim.warmup_ratio == 0.03 and total == cfg.train.steps and warmup == int(np.ceil(0.03 * total))
    assert (cfg.data.max_text_len, cfg.data.max_len, cfg.data.instruct_format) == (2048, 3072, "llava")
    trained = {p.split("/")[0] for p in paths if any(re.search(r, p) for r in cfg.optim.trainable)}
    assert trained == prefixes
  tiny = recipes.get_config("tiny_stage2")
  assert VideoLlavaConfig.from_dict(tiny.model.to_dict()) == recipes.model_config("tiny")
