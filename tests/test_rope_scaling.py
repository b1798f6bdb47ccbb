"""Context extension by linear RoPE scaling (`llama.extend_context`, LLaMA-VID's long-video stage):
the factor the reference's train.py picks, and the extended model against transformers'
LlamaForCausalLM with the same `rope_scaling`, past the original context."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_llama import make_hf, rel_err
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from vllm_jax.converters import llama as llama_conv
from vllm_jax.converters import llama_vid as llama_vid_conv
from vllm_jax.models.llama import Llama, LlamaConfig, extend_context
from vllm_jax.nn.rope import RopeConfig


def reference_factor(model_max_length, max_position_embeddings, rope_scaling=None):
  """The reference train.py's rule: linear scaling, factor ceil(model_max_length / (context x
  the config's factor)), set only when model_max_length exceeds that."""
  context = max_position_embeddings * (rope_scaling or {}).get("factor", 1)
  return float(np.ceil(model_max_length / context)) if model_max_length > context else None


@pytest.mark.parametrize("context, length, trained", [(4096, 65536, 0), (4096, 65536, 4096), (2048, 65536, 4096),
                                                      (1024, 3000, 0), (256, 448, 0)])
def test_factor_follows_the_reference(context, length, trained):
  config = LlamaConfig(max_position_embeddings=context, rope=RopeConfig(theta=5e5))
  out = extend_context(config, length, trained)
  factor = reference_factor(length, max(context, trained))
  assert out.max_position_embeddings == length and out.rope.theta == 5e5
  assert (out.rope.type, out.rope.factor) == (("linear", factor) if factor else ("default", 1.0))
  assert out.replace(max_position_embeddings=context, rope=config.rope) == config


def test_within_the_context_or_the_rope_nothing_scales():
  config = LlamaConfig(max_position_embeddings=2048)
  assert extend_context(config, 2048) is config and extend_context(config, 1000) is config
  assert extend_context(config, 4096, trained=4096) == config.replace(max_position_embeddings=4096)
  scaled = extend_context(config, 8192)
  assert extend_context(scaled, 8192) is scaled
  with pytest.raises(ValueError, match="already scaled .linear, factor 4.0"):
    extend_context(scaled, 16384)


def test_extended_model_matches_transformers_past_the_original_context(tmp_path):
  """A model of 16 positions extended to 60 (factor 4) on a 60-token row: the logits of
  transformers' model with rope_scaling linear 4 (fp32, random init); the unscaled model differs.
  The LLaMA-VID config.json written for it carries the scaling, as the reference reads it."""
  hf, path = make_hf(tmp_path, max_position_embeddings=16)
  config, params = llama_conv.load_hf(path, progress=False)
  extended = extend_context(config, 60)
  assert (extended.rope.type, extended.rope.factor) == ("linear", 4.0)
  scaled_hf = LlamaForCausalLM(HFLlamaConfig(**{**hf.config.to_dict(), "max_position_embeddings": 16,
                                                "rope_scaling": {"rope_type": "linear", "factor": 4.0}})).eval()
  scaled_hf.load_state_dict(hf.state_dict())
  ids = np.random.RandomState(0).randint(3, config.vocab_size, (2, 60))
  with torch.no_grad():
    ref = scaled_hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  ours, _ = Llama(extended).apply({"params": params}, jnp.asarray(ids))
  assert rel_err(ours, ref) <= 1e-5
  unscaled, _ = Llama(config).apply({"params": params}, jnp.asarray(ids))
  assert rel_err(unscaled, ref) > 1e-3  # small logits (random weights), yet far past the match

  hf_config = llama_vid_conv.config_to_hf(llama_vid_conv.BASE.replace(llama=extended))
  assert hf_config["rope_scaling"] == {"type": "linear", "factor": 4.0} and hf_config["max_token"] == 60
  assert llama_vid_conv.config_from_hf(hf_config).llama == extended
