"""The fused attention kernels against XLA's: splash (Pallas, run in interpret mode on this CPU) for
the kernel alone and inside a sharded LLaMA; the `auto` choice; the recipes' switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from vllm_jax.converters import llama as llama_conv
from vllm_jax.nn import attention
from vllm_jax.models.llama import Llama
from vllm_jax.train import sharding


def qkv(batch, length, heads, kv_heads, head_dim=32, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(batch, length, h, head_dim)), jnp.float32)
               for h in (heads, kv_heads, kv_heads))


def valid_rows(length, lengths, left=False):
  """[B, length] bool: each row's `lengths[b]` tokens, on the right of the padding when `left`."""
  slots = np.arange(length)[None]
  lengths = np.asarray(lengths)[:, None]
  return jnp.asarray(slots >= length - lengths if left else slots < lengths)


def attention_and_grads(impl, q, k, v, valid):
  """The attention output and the gradients of a loss over the valid queries only."""
  slots = jnp.arange(q.shape[1])

  def loss(q, k, v):
    y = attention.causal_attention(q, k, v, valid, slots, impl)
    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)  # every output element matters
    return (y * weights * valid[:, :, None, None]).sum(), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return np.asarray(y), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("length,left", [(256, False), (384, True)])  # one tile of 256; three of 128
def test_splash_matches_xla_forward_and_gradients(length, left):
  q, k, v = qkv(2, length, heads=4, kv_heads=2)  # grouped K/V heads
  valid = valid_rows(length, [length, length - 77], left)
  y_ref, g_ref = attention_and_grads("xla", q, k, v, valid)
  y, g = attention_and_grads("splash", q, k, v, valid)
  rows = np.asarray(valid)
  assert np.abs(y - y_ref)[rows].max() < 1e-5 * np.abs(y_ref).max()
  for got, want in zip(g, g_ref):
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
  if left:  # the check can fail: a kernel that ignored the padding before a row would move it
    y_unmasked, _ = attention_and_grads("splash", q, k, v, jnp.ones_like(valid))
    assert np.abs(y_unmasked - y_ref)[rows].max() > 1e-2


def test_sharded_llama_with_splash_matches_xla_on_one_device(tmp_path):
  torch.manual_seed(0)
  hf = LlamaForCausalLM(HFLlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=None, pad_token_id=0))
  hf.save_pretrained(tmp_path / "hf")
  config, params = llama_conv.load_hf(str(tmp_path / "hf"), progress=False)
  ids = jnp.asarray(np.random.default_rng(1).integers(2, 128, size=(4, 128)), jnp.int32)
  mask = valid_rows(128, [128, 100, 64, 1]).astype(jnp.int32)  # right-padded, as training lays rows out

  def loss_and_grad(config, params):
    def loss(params):
      logits, _ = Llama(config).apply({"params": params}, ids, attention_mask=mask)
      return (jax.nn.log_softmax(logits)[..., 7] * mask).sum(), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, ref_logits), ref_grads = loss_and_grad(config, params)
  mesh = sharding.make_mesh((2, 2, 2))
  sharded = sharding.shard_params(params, sharding.param_shardings(llama_conv.abstract_params(config), mesh))
  with sharding.mesh_context(mesh):
    (_, logits), grads = loss_and_grad(config.replace(attention_impl="splash"), sharded)
  valid = np.asarray(mask, bool)
  assert np.abs(np.asarray(logits) - np.asarray(ref_logits))[valid].max() < 1e-4
  for path, got in jax.tree_util.tree_leaves_with_path(grads):
    want = np.asarray(ref_grads_at(ref_grads, path))
    assert np.abs(np.asarray(got) - want).max() <= 1e-4 * np.abs(want).max() + 1e-7, jax.tree_util.keystr(path)


def ref_grads_at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_auto_takes_xla_on_cpu_and_names_are_checked():
  q = jnp.zeros((1, 256, 2, 32), jnp.bfloat16)
  assert attention.resolve_implementation("auto", q) == "xla"
  assert attention.resolve_implementation(None, q) == "xla"
  with sharding.mesh_context(sharding.make_mesh((8, 1, 1))):
    assert attention.resolve_implementation("auto", q) == "xla"  # the mesh's devices are CPUs
  with pytest.raises(ValueError, match="attention_impl 'flash': expected one of xla, cudnn, splash, auto"):
    attention.resolve_implementation("flash", q)
  q, k, v = qkv(1, 200, heads=2, kv_heads=2)
  with pytest.raises(ValueError, match=r"sequence length \(200\) to be a multiple of 128"):
    attention.causal_attention(q, k, v, jnp.ones((1, 200), bool), jnp.arange(200), "splash")
  with pytest.raises(ValueError, match="a whole sequence"):
    attention.causal_attention(q[:, :1], k, v, jnp.ones((1, 200), bool), jnp.arange(1), "cudnn")


def test_recipes_set_the_attention_kernel():
  from configs import video_llava
  from vllm_jax import systems
  from vllm_jax.train import run
  cfg = video_llava.get_config("tiny_stage2")
  system = systems.get(cfg.system)
  config = system.config_class.from_dict(cfg.model.to_dict())
  assert cfg.attention_impl == "auto" and config.llama.attention_impl is None
  assert run.training_config(cfg, system, config).llama.attention_impl == "auto"
