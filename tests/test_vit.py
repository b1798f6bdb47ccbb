"""EVA ViT parity with transformers' Blip2VisionModel (random init, fp32)."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Blip2VisionConfig, Blip2VisionModel

from vllm_jax.converters.core import DictReader, convert
from vllm_jax.converters.eva_vit import TRANSFORMERS, vit_rules
from vllm_jax.models.vit import ViT, ViTConfig, bicubic_matrix

# Tiny models: compile time dominates, so skip the backend's expensive LLVM passes.

CFG = ViTConfig(image_size=42, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=64, final_norm=True)
APPLY = jax.jit(ViT(CFG).apply)


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module")
def reference():
  """A random Blip2VisionModel of CFG (q/v biases set, k bias zero) and our converted params."""
  torch.manual_seed(0)
  ref = Blip2VisionModel(Blip2VisionConfig(
      hidden_size=CFG.width, intermediate_size=CFG.mlp_dim, num_hidden_layers=CFG.depth,
      num_attention_heads=CFG.num_heads, image_size=CFG.image_size, patch_size=CFG.patch_size,
      layer_norm_eps=CFG.layer_norm_eps)).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      torch.nn.init.normal_(p, std=0.2 if p.ndim == 1 else 0.05)
      if name.endswith("qkv.bias"):
        p[CFG.width:2 * CFG.width] = 0  # EVA has no key bias
  images = np.zeros((1, CFG.image_size, CFG.image_size, 3), np.float32)
  abstract = nn.meta.unbox(jax.eval_shape(ViT(CFG).init, jax.random.key(0), images))["params"]
  params = convert(DictReader(ref.state_dict()), vit_rules(CFG, TRANSFORMERS), abstract, progress=False)
  return ref, params


def run_reference(ref, images, interpolate=False):
  with torch.no_grad():
    out = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)), interpolate_pos_encoding=interpolate)
  return out.last_hidden_state.numpy()


def test_parity_with_transformers(reference):
  ref, params = reference
  images = np.random.default_rng(0).normal(size=(2, 42, 42, 3)).astype(np.float32)
  ours = APPLY({"params": params}, images)
  assert ours.shape == (2, 1 + 9, 32)
  assert rel_err(ours, run_reference(ref, images)) <= 1e-5


def test_position_interpolation_matches_transformers(reference):
  """A 56x42 input (4x3 patches) against the 3x3 table, as `interpolate_pos_encoding=True`."""
  ref, params = reference
  images = np.random.default_rng(1).normal(size=(1, 56, 42, 3)).astype(np.float32)
  ours = APPLY({"params": params}, images)
  assert ours.shape == (1, 1 + 12, 32)
  assert rel_err(ours, run_reference(ref, images, interpolate=True)) <= 1e-5


def test_bicubic_matrix_matches_torch():
  x = torch.randn(1, 1, 7, 5, dtype=torch.float64)
  for size in [(16, 9), (3, 2)]:
    want = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False)[0, 0].numpy()
    got = bicubic_matrix(7, size[0]).astype(np.float64) @ x[0, 0].numpy() @ bicubic_matrix(5, size[1]).T
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_bad_image_size_is_named():
  with pytest.raises(ValueError, match="image size 40x42 is not a multiple of the patch size 14"):
    jax.eval_shape(ViT(CFG).init, jax.random.key(0), np.zeros((1, 40, 42, 3), np.float32))


def test_bfloat16_compute_with_fp32_norms(reference):
  """The reference runs the ViT in half precision with fp32 LayerNorms; so can we."""
  _, params = reference
  images = np.random.default_rng(0).normal(size=(2, 42, 42, 3)).astype(np.float32)
  half = jax.jit(ViT(CFG.replace(dtype="bfloat16")).apply)({"params": params}, images)
  assert half.dtype == jnp.bfloat16
  assert rel_err(half, APPLY({"params": params}, images)) <= 3e-2
