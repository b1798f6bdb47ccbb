"""LoRA on the LLaMA against peft's LoRA on transformers' LlamaForCausalLM: forward, adapter
gradients, the PEFT adapter folder (converters/peft.py) both ways, merging, dropout."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from vllm_jax.converters import llama as llama_conv
from vllm_jax.converters import peft as peft_conv
from vllm_jax.converters.core import CheckpointMismatchError, DictReader, convert
from vllm_jax.models.llama import Llama
from vllm_jax.nn import lora

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=None, pad_token_id=0)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 4, 12.0
IDS = np.random.RandomState(0).randint(3, 64, (2, 8))


def make(tmp_path, modules, seed=0):
  """A random base saved at tmp_path/base and peft's LoRA on it with random adapters (B non-zero)
  -> (peft model, base folder, our config with `.lora`, our params: base + adapters)."""
  torch.manual_seed(seed)
  base = LlamaForCausalLM(HFLlamaConfig(**SIZES)).eval()
  path = str(tmp_path / "base")
  base.save_pretrained(path)
  model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                    target_modules=list(modules))).eval()
  for name, p in model.named_parameters():
    if "lora_B" in name:
      torch.nn.init.normal_(p, std=0.1)
  config, params = llama_conv.load_hf(path, progress=False)
  config = config.replace(lora=lora.LoraConfig(
      rank=RANK, alpha=ALPHA, dropout=0.0, targets=tuple(t for t in lora.TARGETS if t + "_proj" in modules)))
  adapters = convert(DictReader(peft.get_peft_model_state_dict(model)), peft_conv.rules(config),
                     peft_conv.abstract_adapter(config), progress=False)
  return model, path, config, combine(params, adapters)


def combine(*trees):
  """One params tree holding the leaves of all `trees`."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree))
  return traverse_util.unflatten_dict(flat)


def adapter_leaves(params):
  return {k: v for k, v in traverse_util.flatten_dict(params, sep="/").items() if k.endswith(("lora_a", "lora_b"))}


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, ids, rngs):
  return Llama(config).apply({"params": params}, ids, rngs=rngs)[0]


def forward(config, params, rngs=None):
  """Our logits [B, T, V] of IDS (jitted: one compile per config and rngs structure)."""
  return np.asarray(_forward(config, params, jnp.asarray(IDS), rngs))


def torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(IDS)).logits.numpy()


def rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("modules", [ALL, ("q_proj", "v_proj")], ids=["all", "q-v"])
def test_forward_matches_peft(tmp_path, modules):
  model, _, config, params = make(tmp_path, modules)
  ref = torch_logits(model)
  with model.disable_adapter():
    assert rel_err(torch_logits(model), ref) > 1e-2  # the adapters matter
  assert rel_err(forward(config, params), ref) <= 1e-5


def test_adapter_gradients_match_torch(tmp_path):
  model, _, config, params = make(tmp_path, ALL)
  ids = torch.tensor(IDS)
  logits = model(ids).logits
  torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, SIZES["vocab_size"]), ids[:, 1:].reshape(-1)).backward()
  trainable = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
  assert all(".lora_" in n for n in trainable)  # base frozen
  ref = adapter_leaves(convert(DictReader(trainable), peft_conv.rules(config), peft_conv.abstract_adapter(config),
                               progress=False))
  flat = traverse_util.flatten_dict(params, sep="/")
  base = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in ref}, sep="/")

  def loss(adapters):
    logits = Llama(config).apply({"params": combine(base, adapters)}, jnp.asarray(IDS))[0][:, :-1]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(IDS)[:, 1:, None], axis=-1))

  grads = adapter_leaves(jax.grad(loss)(traverse_util.unflatten_dict(adapter_leaves(params), sep="/")))
  assert sorted(grads) == sorted(ref) and len(ref) == 2 * 7
  for key in ref:
    assert rel_err(grads[key], ref[key]) <= 1e-5, key


def test_save_adapter_loads_in_peft_and_round_trips(tmp_path):
  model, path, config, params = make(tmp_path, ("k_proj", "o_proj", "down_proj"))
  out = str(tmp_path / "adapter")
  peft_conv.save_adapter(config, params, out, base_model="tiny-llama")
  hf = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path), out).eval()
  assert hf.peft_config["default"].base_model_name_or_path == "tiny-llama"
  assert rel_err(forward(config, params), torch_logits(hf)) <= 1e-5
  loaded_config, adapters = peft_conv.load_adapter(out, config.replace(lora=None))
  assert loaded_config == config
  want, got = adapter_leaves(params), traverse_util.flatten_dict(adapters, sep="/")
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def saved_adapter(tmp_path):
  """A PEFT folder of all-ones adapters on every projection of the tiny LLaMA -> (folder, config)."""
  config = llama_conv.config_from_hf(SIZES, lora=lora.LoraConfig(rank=RANK, alpha=ALPHA))
  adapters = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), peft_conv.abstract_adapter(config))
  out = str(tmp_path / "adapter")
  peft_conv.save_adapter(config, adapters, out)
  return out, config


def test_load_adapter_names_bad_keys(tmp_path):
  out, config = saved_adapter(tmp_path)
  file = os.path.join(out, "adapter_model.safetensors")
  prefix = "base_model.model.model.layers."
  tensors = load_file(file)
  del tensors[prefix + "1.self_attn.q_proj.lora_A.weight"]
  tensors["base_model.model.lm_head.lora_A.weight"] = np.ones((RANK, 32), np.float32)
  tensors[prefix + "0.self_attn.k_proj.lora_B.weight"] = np.ones((32, RANK), np.float32)
  save_file(tensors, file)
  with pytest.raises(CheckpointMismatchError) as err:
    peft_conv.load_adapter(out, config)
  assert err.value.missing == [prefix + "1.self_attn.q_proj.lora_A.weight"]
  assert err.value.unexpected == ["base_model.model.lm_head.lora_A.weight"]
  assert err.value.misshaped == [(prefix + "0.self_attn.k_proj.lora_B.weight", (32, RANK), (16, RANK))]


@pytest.mark.parametrize("change, named", [
    ({"use_rslora": True}, "use_rslora"), ({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias='all'"),
    ({"target_modules": ["q_proj", "lm_head"]}, "['lm_head']"), ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"), ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ".*proj"}, "a regex"), ({"peft_type": "IA3"}, "peft_type='IA3'")])
def test_load_adapter_refuses_unsupported_configs(tmp_path, change, named):
  out, config = saved_adapter(tmp_path)
  path = os.path.join(out, "adapter_config.json")
  with open(path) as f:
    hf = json.load(f)
  with open(path, "w") as f:
    json.dump({**hf, **change}, f)
  with pytest.raises(ValueError, match="unsupported LoRA adapter config") as err:
    peft_conv.load_adapter(out, config)
  assert named in str(err.value)


def test_merged_model_equals_adapted_and_peft_merge(tmp_path):
  model, _, config, params = make(tmp_path, ALL)
  merged = lora.merge(params, config.lora)
  assert not adapter_leaves(merged)
  out = str(tmp_path / "merged")
  llama_conv.save_hf(config.replace(lora=None), merged, out)
  ref = torch_logits(LlamaForCausalLM.from_pretrained(out).eval())
  assert rel_err(forward(config, params), ref) <= 1e-5
  with model.disable_adapter():
    assert rel_err(torch_logits(model), ref) > 1e-2  # the merge changed the weights
  assert rel_err(torch_logits(model.merge_and_unload()), ref) <= 1e-5


def test_dropout_only_with_a_dropout_rng():
  config = llama_conv.config_from_hf(SIZES, lora=lora.LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.5))
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), peft_conv.abstract_adapter(config))
  flat = traverse_util.flatten_dict(nn.meta.unbox(llama_conv.abstract_params(config)), sep="/")
  params = combine(params, traverse_util.unflatten_dict(
      {k: rng.normal(0, 0.1, s.shape).astype(s.dtype) for k, s in flat.items() if "lora" not in k}, sep="/"))
  b_zero = jax.tree_util.tree_map_with_path(lambda path, x: x * (path[-1].key != "lora_b"), params)
  np.testing.assert_array_equal(forward(config, b_zero, rngs={"dropout": jax.random.key(1)}),
                                forward(config, b_zero))  # dropout leaves the base path alone
  plain = forward(config, params)
  np.testing.assert_array_equal(plain, forward(config.replace(lora=config.lora.replace(dropout=0.0)), params))
  first = forward(config, params, rngs={"dropout": jax.random.key(1)})
  second = forward(config, params, rngs={"dropout": jax.random.key(3)})
  assert rel_err(first, plain) > 1e-3 and rel_err(second, first) > 1e-3
