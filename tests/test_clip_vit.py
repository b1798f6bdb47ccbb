"""CLIP ViT parity with transformers' CLIPVisionModel, and LanguageBind's video tower (temporal
attention) parity with the `languagebind` reference code (random init, fp32)."""

import importlib
import importlib.machinery
import importlib.util
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from vllm_jax.converters.clip import clip_unused, vision_rules
from vllm_jax.converters.core import CheckpointMismatchError, DictReader, check, convert, export
from vllm_jax.models.vit import CLIP_VIT_L, ViT

LAYERS = 3  # the reference's layers; ours holds LAYERS - 1, as Video-LLaVA uses layer -2
CFG = CLIP_VIT_L.replace(image_size=28, patch_size=14, width=32, depth=LAYERS - 1, num_heads=4, mlp_dim=64)
FRAMES = 3
VIDEO_CFG = CFG.replace(temporal_frames=FRAMES)
LB_PREFIX = "vision_model."


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.abs(ours - ref).max() / np.abs(ref).max()


def randomize(model):
  """Every parameter random (LayerNorm scales around 1), so that no mapping hides behind an init."""
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        torch.nn.init.normal_(p, mean=1.0, std=0.2)
      else:
        torch.nn.init.normal_(p, std=0.2 if p.ndim == 1 else 0.05)
  return model.eval()


def abstract_params(config, frames=1):
  images = jax.ShapeDtypeStruct((frames, config.image_size, config.image_size, 3), np.float32)
  return nn.meta.unbox(jax.eval_shape(ViT(config).init, jax.random.key(0), images))["params"]


def clip_kwargs(config, layers):
  return dict(hidden_size=config.width, intermediate_size=config.mlp_dim, num_hidden_layers=layers,
              num_attention_heads=config.num_heads, image_size=config.image_size,
              patch_size=config.patch_size, layer_norm_eps=config.layer_norm_eps, hidden_act="quick_gelu")


def languagebind_video():
  """languagebind's video modules, imported without the package `__init__` (it loads every modality)."""
  spec = importlib.util.find_spec("languagebind")
  if spec is None:
    pytest.skip("languagebind is not installed (pip install --no-deps languagebind peft accelerate)")
  root = spec.submodule_search_locations[0]
  for name, path in (("languagebind", root), ("languagebind.video", os.path.join(root, "video"))):
    if name not in sys.modules:
      package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
      package.__path__ = package.__spec__.submodule_search_locations = [path]
      sys.modules[name] = package
  return (importlib.import_module("languagebind.video.configuration_video"),
          importlib.import_module("languagebind.video.modeling_video"))


def languagebind_vision_config(lb_config, config, layers):
  return lb_config.CLIPVisionConfig(**clip_kwargs(config, layers), add_time_attn=True,
                                    num_frames=config.temporal_frames)


@pytest.fixture(scope="module")
def clip():
  ref = randomize(CLIPVisionModel(CLIPVisionConfig(**clip_kwargs(CFG, LAYERS))))
  state = ref.state_dict()
  params = convert(DictReader(state), vision_rules(CFG), abstract_params(CFG),
                   ignore=clip_unused("", LAYERS, CFG), progress=False)
  return ref, state, params


@pytest.fixture(scope="module")
def languagebind():
  lb_config, lb_model = languagebind_video()
  ref = randomize(lb_model.CLIPVisionModel(languagebind_vision_config(lb_config, VIDEO_CFG, LAYERS)))
  state = ref.state_dict()
  params = convert(DictReader(state), vision_rules(VIDEO_CFG, LB_PREFIX), abstract_params(VIDEO_CFG, FRAMES),
                   ignore=clip_unused(LB_PREFIX, LAYERS, VIDEO_CFG), progress=False)
  return ref, state, params


def test_parity_with_transformers_clip(clip):
  ref, _, params = clip
  images = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
  ours = jax.jit(ViT(CFG).apply)({"params": params}, images)
  with torch.no_grad():
    want = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True).hidden_states[-2]
  assert ours.shape == (2, 1 + 4, 32)
  err = rel_err(ours, want.numpy())
  print(f"CLIP max relative error {err:.2e}")
  assert err <= 1e-5


def test_parity_with_languagebind_video(languagebind):
  """Two videos of FRAMES frames: ours takes [B*T, H, W, 3], the reference [B, 3, T, H, W]."""
  ref, _, params = languagebind
  videos = np.random.default_rng(1).normal(size=(2, FRAMES, 28, 28, 3)).astype(np.float32)
  ours = jax.jit(ViT(VIDEO_CFG).apply)({"params": params}, videos.reshape(-1, 28, 28, 3))
  with torch.no_grad():
    out = ref(torch.from_numpy(videos.transpose(0, 4, 1, 2, 3)), output_hidden_states=True)
  want = out.hidden_states[-2].numpy()  # [(b t), 1 + G*G, D]
  assert ours.shape == want.shape == (2 * FRAMES, 5, 32)
  err = rel_err(ours, want)
  print(f"LanguageBind video max relative error {err:.2e}")
  assert err <= 1e-5
  # The temporal step mixes frames: a change to one frame moves the others' features.
  changed = videos.copy()
  changed[0, 0] += 1.0
  moved = jax.jit(ViT(VIDEO_CFG).apply)({"params": params}, changed.reshape(-1, 28, 28, 3))
  assert np.abs(np.asarray(moved - ours)[1:FRAMES]).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(moved)[FRAMES:], np.asarray(ours)[FRAMES:])


def test_video_batch_must_be_whole_videos():
  with pytest.raises(ValueError, match="4 images are not whole videos of temporal_frames=3"):
    jax.eval_shape(ViT(VIDEO_CFG).init, jax.random.key(0), np.zeros((4, 28, 28, 3), np.float32))


@pytest.mark.parametrize("layout", ["clip", "languagebind"])
def test_round_trip(layout, request):
  _, state, params = request.getfixturevalue(layout)
  config, prefix = (CFG, "") if layout == "clip" else (VIDEO_CFG, LB_PREFIX)
  exported = dict(export(params, vision_rules(config, prefix)))
  kept = {k for k in state if k.startswith(f"{prefix}encoder.layers.{LAYERS - 1}.")}
  kept |= {prefix + k for k in ("post_layernorm.weight", "post_layernorm.bias", "embeddings.position_ids")}
  assert set(exported) == set(state) - kept
  for key, value in exported.items():
    np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)


def test_mismatched_keys_are_named(languagebind):
  _, state, _ = languagebind
  state = dict(state)
  del state[LB_PREFIX + "encoder.layers.1.temporal_attn.k_proj.bias"]
  state[LB_PREFIX + "encoder.layers.0.temporal_mlp.fc1.weight"] = torch.zeros(64, 32)
  state[LB_PREFIX + "encoder.layers.0.temporal_embedding"] = torch.zeros(1, FRAMES + 1, 32)
  with pytest.raises(CheckpointMismatchError) as info:
    check(DictReader(state), vision_rules(VIDEO_CFG, LB_PREFIX), abstract_params(VIDEO_CFG, FRAMES),
          ignore=clip_unused(LB_PREFIX, LAYERS, VIDEO_CFG))
  message = str(info.value)
  assert "missing keys (1): vision_model.encoder.layers.1.temporal_attn.k_proj.bias" in message
  assert "unexpected keys (1): vision_model.encoder.layers.0.temporal_mlp.fc1.weight" in message
  assert ("shape mismatch for vision_model.encoder.layers.0.temporal_embedding: checkpoint has [1, 4, 32], "
          "model expects [1, 3, 32]") in message


def test_full_size_names_and_shapes():
  """CLIP ViT-L/14 and the 8-frame video tower against the references' full-size key names and
  shapes (meta tensors: nothing is allocated), with the prefixes of the Video-LLaVA-7B-hf files."""
  with torch.device("meta"):
    image = CLIPVisionModel(CLIPVisionConfig(**clip_kwargs(CLIP_VIT_L, 24)))
  image_state = {"image_tower.vision_model." + k: v for k, v in image.state_dict().items()}
  check(DictReader(image_state), vision_rules(CLIP_VIT_L, "image_tower.vision_model."),
        abstract_params(CLIP_VIT_L), ignore=clip_unused("image_tower.vision_model.", 24))
  lb_config, lb_model = languagebind_video()
  video_cfg = CLIP_VIT_L.replace(temporal_frames=8)
  with torch.device("meta"):
    video = lb_model.CLIPVisionModel(languagebind_vision_config(lb_config, video_cfg, 24))
  check(DictReader(video.state_dict()), vision_rules(video_cfg, LB_PREFIX), abstract_params(video_cfg, 8),
        ignore=clip_unused(LB_PREFIX, 24, video_cfg))
