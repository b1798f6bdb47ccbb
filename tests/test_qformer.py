"""Q-Former parity with transformers' Blip2QFormerModel (random init, fp32)."""


import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from vllm_jax.converters.blip2 import TRANSFORMERS, qformer_rules
from vllm_jax.converters.core import DictReader, convert
from vllm_jax.models.qformer import QFormer, QFormerConfig

# Tiny models: compile time dominates, so skip the backend's expensive LLVM passes.


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.abs(ours - ref).max() / np.abs(ref).max()


def reference_and_params(cfg: QFormerConfig, seed=0):
  """A random transformers Q-Former of `cfg`, its query tokens, and our params converted from it."""
  torch.manual_seed(seed)
  ref = Blip2QFormerModel(Blip2QFormerConfig(
      hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.intermediate_size, encoder_hidden_size=cfg.encoder_width,
      cross_attention_frequency=cfg.cross_attention_frequency, layer_norm_eps=cfg.layer_norm_eps)).eval()
  for p in ref.parameters():  # the default init leaves biases at zero and norms at one: test them too
    torch.nn.init.normal_(p, std=0.2)
  query_tokens = torch.randn(1, cfg.num_queries, cfg.hidden_size)
  state = {**ref.state_dict(), "query_tokens": query_tokens}
  memory = np.zeros((1, 3, cfg.encoder_width), np.float32)
  abstract = nn.meta.unbox(jax.eval_shape(QFormer(cfg).init, jax.random.key(0), memory))["params"]
  rules = qformer_rules(cfg, "", layout=TRANSFORMERS, query_tokens="query_tokens")
  params = convert(DictReader(state), rules, abstract, progress=False)
  return ref, query_tokens, params


def run_reference(ref, query_tokens, memory, memory_mask=None):
  with torch.no_grad():
    out = ref(query_embeds=query_tokens.expand(memory.shape[0], -1, -1),
              encoder_hidden_states=torch.from_numpy(memory),
              encoder_attention_mask=None if memory_mask is None else torch.from_numpy(memory_mask).long())
  return out.last_hidden_state.numpy()


IMAGE = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=48,
                      cross_attention_frequency=2, num_queries=8)
VIDEO = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=32,
                      cross_attention_frequency=1, num_queries=8)
APPLY = {cfg: jax.jit(QFormer(cfg).apply) for cfg in (IMAGE, VIDEO)}


@pytest.mark.parametrize("cfg", [IMAGE, VIDEO], ids=["image", "video"])
def test_parity_with_transformers(cfg):
  ref, query_tokens, params = reference_and_params(cfg)
  memory = np.random.default_rng(0).normal(size=(2, 10, cfg.encoder_width)).astype(np.float32)
  ours = APPLY[cfg]({"params": params}, memory)
  assert ours.shape == (2, cfg.num_queries, cfg.hidden_size)
  assert rel_err(ours, run_reference(ref, query_tokens, memory)) <= 1e-5


def test_padded_memory_matches_transformers_and_truncation():
  ref, query_tokens, params = reference_and_params(IMAGE, seed=1)
  memory = np.random.default_rng(1).normal(size=(2, 10, IMAGE.encoder_width)).astype(np.float32)
  mask = np.ones((2, 10), bool)
  mask[1, 6:] = False
  ours = np.asarray(APPLY[IMAGE]({"params": params}, memory, mask))
  assert rel_err(ours, run_reference(ref, query_tokens, memory, mask)) <= 1e-5
  truncated = APPLY[IMAGE]({"params": params}, memory[1:, :6])
  np.testing.assert_allclose(ours[1:], truncated, rtol=1e-5, atol=1e-5)
  unmasked = APPLY[IMAGE]({"params": params}, memory)
  assert np.abs(ours[1] - unmasked[1]).max() > 1e-3  # the mask changes the padded example
  np.testing.assert_allclose(ours[0], unmasked[0], rtol=1e-6, atol=1e-6)


def test_remat_and_given_queries():
  _, query_tokens, params = reference_and_params(IMAGE)
  memory = np.random.default_rng(2).normal(size=(2, 10, IMAGE.encoder_width)).astype(np.float32)
  plain = APPLY[IMAGE]({"params": params}, memory)
  remat = jax.jit(QFormer(IMAGE.replace(remat_policy="nothing_saveable")).apply)({"params": params}, memory)
  np.testing.assert_allclose(plain, remat, rtol=1e-6, atol=1e-6)
  given = APPLY[IMAGE]({"params": params}, memory,
                               query_embeds=np.broadcast_to(query_tokens.numpy(), (2, 8, 32)))
  np.testing.assert_allclose(plain, given, rtol=1e-6, atol=1e-6)


def test_wrong_memory_width_is_named():
  with pytest.raises(ValueError, match="memory width 40 != encoder_width 48"):
    jax.eval_shape(QFormer(IMAGE).init, jax.random.key(0), np.zeros((1, 3, 40), np.float32))
