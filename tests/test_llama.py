"""LLaMA decoder, converter and generation against transformers' LlamaForCausalLM."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from vllm_jax import generate as gen
from vllm_jax.converters import llama as llama_conv
from vllm_jax.converters.core import CheckpointMismatchError, DictReader, TorchReader, convert, open_checkpoint
from vllm_jax.data.tokenizer import left_pad
from vllm_jax.models.llama import Llama
from vllm_jax.train import sharding

VARIANTS = {
    "mha-untied-default": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied-linear": dict(num_key_value_heads=2, tie_word_embeddings=True,
                            rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "gqa-llama3-bias": dict(num_key_value_heads=1, attention_bias=True, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def make_hf(tmp_path, seed=0, **overrides):
  torch.manual_seed(seed)
  kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=None, pad_token_id=0)
  kwargs.update(overrides)
  model = LlamaForCausalLM(HFLlamaConfig(**kwargs)).eval()
  path = str(tmp_path / "hf")
  model.save_pretrained(path)
  return model, path


def prompts(batch_lengths=(11, 5, 8, 3), vocab=128, seed=0):
  rng = np.random.RandomState(seed)
  return left_pad([rng.randint(3, vocab, n).tolist() for n in batch_lengths])


def rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
  hf, path = make_hf(tmp_path, **VARIANTS[variant])
  config, params = llama_conv.load_hf(path, progress=False)
  ids, mask = prompts()
  with torch.no_grad():
    ref = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
  logits, _ = Llama(config).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  valid = mask.astype(bool)
  assert rel_err(np.asarray(logits)[valid], ref[valid]) <= 1e-5


@pytest.mark.parametrize("variant", ["mha-untied-default", "gqa-llama3-bias"])
def test_greedy_generation_matches_transformers(tmp_path, variant):
  hf, path = make_hf(tmp_path, seed=1, **VARIANTS[variant])
  config, params = llama_conv.load_hf(path, progress=False)
  ids, mask = prompts(vocab=config.vocab_size, seed=1)
  with torch.no_grad():
    ref = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                      max_new_tokens=32, do_sample=False, pad_token_id=0)[:, ids.shape[1]:].numpy()
  out = gen.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=32)
  np.testing.assert_array_equal(out.tokens, ref)
  embeds = gen.embed_tokens(config, params, jnp.asarray(ids))
  out = gen.generate(config, params, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=32)
  np.testing.assert_array_equal(out.tokens, ref)


def test_cached_forward_equals_full_forward(tmp_path):
  _, path = make_hf(tmp_path)
  config, params = llama_conv.load_hf(path, progress=False)
  ids, mask = prompts()
  model = Llama(config)
  full, _ = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  from vllm_jax.models.llama import KVCache
  cache = KVCache.init(config, ids.shape[0], ids.shape[1] + 4)
  first, cache = model.apply({"params": params}, jnp.asarray(ids[:, :6]), attention_mask=jnp.asarray(mask[:, :6]),
                             cache=cache)
  rest, cache = model.apply({"params": params}, jnp.asarray(ids[:, 6:]), attention_mask=jnp.asarray(mask[:, 6:]),
                            cache=cache)
  both = np.concatenate([first, rest], axis=1)
  valid = mask.astype(bool)
  assert rel_err(both[valid], np.asarray(full)[valid]) <= 1e-5
  assert int(cache.index) == ids.shape[1]


def test_round_trip_is_bit_identical(tmp_path):
  hf, path = make_hf(tmp_path, **VARIANTS["gqa-llama3-bias"])
  config, params = llama_conv.load_hf(path, progress=False)
  out = str(tmp_path / "exported")
  llama_conv.save_hf(config, params, out, max_shard_bytes=64 << 10)  # forces several shards
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  back = LlamaForCausalLM.from_pretrained(out)
  assert back.config.rope_parameters["rope_type"] == "llama3"
  ref = hf.state_dict()
  got = back.state_dict()
  assert sorted(ref) == sorted(got)
  for key in ref:
    assert torch.equal(ref[key], got[key]), key


def test_reads_bin_checkpoints_and_bf16(tmp_path):
  hf, path = make_hf(tmp_path)
  state = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
  torch.save(state, tmp_path / "pytorch_model.bin")
  reader = open_checkpoint(str(tmp_path / "pytorch_model.bin"))
  assert isinstance(reader, TorchReader)
  config, _ = llama_conv.load_hf(path, progress=False)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16),
                          jax.eval_shape(lambda: _unboxed(config)))
  params = convert(reader, llama_conv.rules(config), abstract, progress=False)
  q = params["layers"]["attn"]["q"]["kernel"]
  assert q.dtype == jnp.bfloat16
  ref = state["model.layers.1.self_attn.q_proj.weight"].float().numpy()
  np.testing.assert_array_equal(q[1].astype(np.float32).reshape(64, -1), ref.T)


def _unboxed(config):
  import flax.linen as nn
  return nn.meta.unbox(llama_conv.abstract_params(config))


def _converter_error(tmp_path, mutate):
  hf, path = make_hf(tmp_path)
  config, _ = llama_conv.load_hf(path, progress=False)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  mutate(state)
  with pytest.raises(CheckpointMismatchError) as err:
    convert(DictReader(state), llama_conv.rules(config), _unboxed(config), progress=False)
  return str(err.value)


def test_converter_names_missing_layer(tmp_path):
  def drop_layer(state):
    for key in [k for k in state if k.startswith("model.layers.1.")]:
      del state[key]
  message = _converter_error(tmp_path, drop_layer)
  assert "missing keys (9)" in message
  assert "model.layers.1.self_attn.q_proj.weight" in message and "model.layers.1.mlp.down_proj.weight" in message


def test_converter_names_unexpected_key(tmp_path):
  message = _converter_error(tmp_path, lambda s: s.update({"model.layers.0.self_attn.extra.weight": np.zeros(3)}))
  assert "unexpected keys (1): model.layers.0.self_attn.extra.weight" in message


def test_converter_names_vocab_mismatch(tmp_path):
  def grow_vocab(state):
    state["model.embed_tokens.weight"] = np.zeros((129, 64), np.float32)
    state["lm_head.weight"] = np.zeros((129, 64), np.float32)
  message = _converter_error(tmp_path, grow_vocab)
  assert "shape mismatch for model.embed_tokens.weight: checkpoint has [129, 64], model expects [128, 64]" in message
  assert "shape mismatch for lm_head.weight" in message


def test_sharded_forward_and_decode_match_single_device(tmp_path):
  _, path = make_hf(tmp_path, num_attention_heads=4, num_key_value_heads=2)
  config, params = llama_conv.load_hf(path, progress=False)
  ids, mask = prompts()
  model = Llama(config)
  ref_logits, _ = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  ref = gen.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=4)

  mesh = sharding.make_mesh((2, 2, 2))
  shardings = sharding.param_shardings(llama_conv.abstract_params(config), mesh)
  sharded = sharding.shard_params(params, shardings)
  q = sharded["layers"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 2, 16)
  with sharding.mesh_context(mesh):
    logits, _ = jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m))(
        sharded, jnp.asarray(ids), jnp.asarray(mask))
    out = gen.generate(config, sharded, input_ids=ids, attention_mask=mask, max_new_tokens=4)
  assert logits.sharding.spec[0] == ("data", "fsdp")
  valid = mask.astype(bool)
  assert rel_err(np.asarray(logits)[valid], np.asarray(ref_logits)[valid]) <= 1e-5
  np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_hf_config_fields_round_trip(tmp_path):
  _, path = make_hf(tmp_path, **VARIANTS["gqa-llama3-bias"])
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  config = llama_conv.config_from_hf(hf)
  assert config.rope.type == "llama3" and config.rope.theta == 500000.0 and config.num_kv_heads == 1
  assert llama_conv.config_from_hf(llama_conv.config_to_hf(config)) == config
