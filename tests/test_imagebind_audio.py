"""ImageBind audio encoder vs the reference code (`imagebind-unofficial`, test-only, CC BY-NC-SA),
converters both ways, full-size shapes against the reference's state dict on torch's meta device."""

import importlib.util
import os
import re
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vllm_jax.converters import core
from vllm_jax.converters import imagebind as conv
from vllm_jax.models.imagebind_audio import ImageBindAudio, ImageBindAudioConfig

SMALL = dict(audio_embed_dim=64, audio_num_blocks=3, audio_num_heads=4, out_embed_dim=48)
SMALL_CONFIG = ImageBindAudioConfig(width=64, num_layers=3, num_heads=4, mlp_dim=256, out_dim=48)
# The other modalities, as small as the reference allows (their keys must be ignored).
TINY_OTHERS = dict(vision_embed_dim=32, vision_num_blocks=1, vision_num_heads=2, text_embed_dim=32,
                   text_num_blocks=1, text_num_heads=2, depth_embed_dim=32, depth_num_blocks=1,
                   depth_num_heads=2, thermal_embed_dim=32, thermal_num_blocks=1, thermal_num_heads=2,
                   imu_embed_dim=32, imu_num_blocks=1, imu_num_heads=2)


def imagebind_reference():
  """The reference's model module, imported without its package `__init__` (which pulls
  torchaudio/torchvision); `timm.layers` (which pulls torchvision) is replaced by the two
  names the module uses when timm cannot be imported. None when the package is absent."""
  spec = importlib.util.find_spec("imagebind")
  if spec is None or not spec.submodule_search_locations:
    return None
  root = list(spec.submodule_search_locations)[0]
  for name, path in (("imagebind", root), ("imagebind.models", os.path.join(root, "models"))):
    if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
      package = types.ModuleType(name)
      package.__path__ = [path]
      sys.modules[name] = package
  try:
    import timm.layers  # noqa: F401
  except Exception:
    layers = types.ModuleType("timm.layers")
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    layers.DropPath = DropPathEval
    sys.modules["timm"] = types.ModuleType("timm")
    sys.modules["timm.layers"] = layers
  return importlib.import_module("imagebind.models.imagebind_model")


class DropPathEval(torch.nn.Module):
  """Stand-in for timm's DropPath in evaluation (the only mode the parity tests use)."""

  def __init__(self, drop_prob=0.0):
    super().__init__()
    self.drop_prob = drop_prob

  def forward(self, x):
    assert not self.training, "the stand-in DropPath supports eval only"
    return x


REF = imagebind_reference()
needs_reference = pytest.mark.skipif(
    REF is None, reason="imagebind-unofficial is not installed (pip install --no-deps imagebind-unofficial "
                        "ftfy wcwidth iopath portalocker; launch/test.sh does this)")


def small_reference(seed=0):
  torch.manual_seed(seed)
  model = REF.ImageBindModel(**SMALL, **TINY_OTHERS).eval()
  with torch.no_grad():  # non-trivial norms, biases and bias_k/v (the reference inits some to 0)
    for name, p in model.named_parameters():
      if ".audio." in name and (name.endswith("bias") or "norm" in name or "bias_" in name):
        p.add_(0.1 * torch.randn_like(p))
  return model


def reference_embed(model, clips):
  """Video-LLaMA's use of the reference: per-clip final embeddings, no mean over clips."""
  tokens = model.modality_preprocessors["audio"](audio=clips)["trunk"]
  x = model.modality_trunks["audio"](**tokens)
  return model.modality_postprocessors["audio"](model.modality_heads["audio"](x))


def converted_params(model, config):
  return conv.convert_audio_encoder(core.DictReader(model.state_dict()), config, progress=False)


@needs_reference
def test_encoder_matches_reference_small():
  model = small_reference()
  clips = torch.randn(3, 1, 128, 204)
  with torch.no_grad():
    ref = reference_embed(model, clips).numpy()
  params = converted_params(model, SMALL_CONFIG)
  ours = ImageBindAudio(SMALL_CONFIG).apply({"params": params}, jnp.asarray(clips.numpy()))
  rel = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
  print(f"imagebind audio small: max rel err {rel:.2e}")
  assert ours.shape == (3, 48) and rel <= 1e-5
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 20.0, rtol=1e-5)


@needs_reference
def test_export_roundtrip_matches_reference_state_dict():
  model = small_reference(seed=1)
  params = converted_params(model, SMALL_CONFIG)
  state = model.state_dict()
  exported = dict(conv.export_audio_encoder(params, SMALL_CONFIG))
  audio_keys = {k for k in state if ".audio." in k}
  assert set(exported) == audio_keys
  for key, value in exported.items():
    np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)


@needs_reference
def test_full_size_shapes_match_reference_on_meta_device(monkeypatch):
  linspace = torch.linspace  # the reference reads drop-path rates with .item(): keep them on CPU
  monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
  with torch.device("meta"):
    model = REF.imagebind_huge(pretrained=False)
  model = model[0] if isinstance(model, tuple) else model
  ref_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  config = ImageBindAudioConfig()
  abstract = nn.meta.unbox(conv.abstract_params(config))
  ours = core.expected_source_shapes(conv.rules(config), abstract)
  assert ours == {k: s for k, s in ref_shapes.items() if ".audio." in k}
  assert ref_shapes["modality_preprocessors.audio.pos_embedding_helper.pos_embed"] == (1, 229, 768)
  # Everything else in the checkpoint belongs to the other modalities, which the converter ignores.
  others = [k for k in ref_shapes if k not in ours]
  assert others and all(any(re.fullmatch(p, k) for p in conv.OTHER_MODALITIES) for k in others)


def test_full_size_forward_shapes():
  config = ImageBindAudioConfig()
  clips = jax.ShapeDtypeStruct((2, 8, 1, 128, 204), jnp.float32)
  abstract = jax.eval_shape(ImageBindAudio(config).init, jax.random.key(0), clips)
  params = nn.meta.unbox(abstract["params"])
  assert config.grid == (12, 19) and params["pos_embed"].shape == (229, 768)
  assert params["blocks"]["attn"]["bias_k"].shape == (12, 12, 64)
  out = jax.eval_shape(ImageBindAudio(config).apply, abstract, clips)
  assert out.shape == (2, 8, 1024)


@pytest.fixture(scope="module")
def small_params():
  """Random parameters of the small encoder, drawn in numpy (compiling `init` is slow on CPU)."""
  abstract = nn.meta.unbox(conv.abstract_params(SMALL_CONFIG))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)
  return {**params, "log_logit_scale": np.float32(np.log(20.0))}


def test_mismatched_checkpoint_names_keys(small_params):
  config = SMALL_CONFIG
  state = dict(conv.export_audio_encoder(small_params, config))
  state.pop("modality_trunks.audio.blocks.1.attn.bias_k")
  state["modality_heads.audio.2.weight"] = np.zeros((7, 64), np.float32)
  state["modality_trunks.vision.blocks.0.norm_1.weight"] = np.zeros(3)  # ignored
  state["modality_trunks.audio.extra"] = np.zeros(3)
  with pytest.raises(core.CheckpointMismatchError) as err:
    conv.convert_audio_encoder(core.DictReader(state), config, progress=False)
  msg = str(err.value)
  assert "blocks.1.attn.bias_k" in msg and "modality_heads.audio.2.weight" in msg
  assert "modality_trunks.audio.extra" in msg and "vision" not in msg


def test_drop_path_only_when_training(small_params):
  apply = jax.jit(ImageBindAudio(SMALL_CONFIG.replace(drop_path=0.5)).apply, static_argnames="train")
  run = lambda train, seed=0: apply({"params": small_params}, clips, train=train,
                                    rngs={"dropout": jax.random.key(seed)})
  clips = jax.random.normal(jax.random.key(1), (16, 1, 128, 204))
  eval_out, a, b = run(False), run(True, 0), run(True, 1)
  np.testing.assert_array_equal(a, run(True, 0))
  assert not np.allclose(a, eval_out, atol=1e-3) and not np.allclose(a, b, atol=1e-3)


def test_logit_scale_gets_no_gradient(small_params):
  model = ImageBindAudio(SMALL_CONFIG)
  clips = jax.random.normal(jax.random.key(1), (2, 1, 128, 204))
  loss = lambda scale: model.apply({"params": {**small_params, "log_logit_scale": scale}}, clips)[:, 0].sum()
  value, grad = jax.jit(jax.value_and_grad(loss))(small_params["log_logit_scale"])
  assert float(grad) == 0.0 and float(value) != 0.0
