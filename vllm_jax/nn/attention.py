"""Attention: masks, the scaled dot-product kernel, and the encoder multi-head attention.

The decoder attention with RoPE and a KV cache lives with the LLaMA model; both use
`dot_product_attention` here, so a fused kernel is a one-line switch for every model.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllm_jax.nn.layers import Dense, Dtype, Initializer


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None,
                          implementation: str | None = None) -> jax.Array:
  """Softmax attention with grouped K/V heads.

  q: [B, T, H, D]; k, v: [B, S, K, D] with K dividing H; mask: bool, broadcastable to
  [B, H, T, S] (True = attend). A fully masked row gives a uniform average, never NaN.
  `implementation`: None (XLA) or "cudnn" for the fused GPU kernel.
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def padding_mask(key_valid: jax.Array) -> jax.Array:
  """key_valid: [B, S] bool -> [B, 1, 1, S] (every query sees the valid keys)."""
  return key_valid[:, None, None, :].astype(bool)


def causal_mask(key_valid: jax.Array, query_slots: jax.Array) -> jax.Array:
  """Causal mask over cache slots.

  key_valid: [B, S] bool; query_slots: [T] slot index of each query -> [B, 1, T, S].
  """
  key_slots = jnp.arange(key_valid.shape[-1])
  causal = key_slots[None, :] <= query_slots[:, None]
  return causal[None, None] & key_valid[:, None, None, :].astype(bool)


class MultiHeadAttention(nn.Module):
  """Bidirectional multi-head attention for encoders (ViT, Q-Former, ImageBind).

  x: [B, T, E]; memory (cross-attention, any width): [B, S, E_m]; mask: bool broadcastable
  to [B, H, T, S] -> [B, T, E].
  `qkv_bias` switches the bias of q, k and v separately (EVA has no key bias);
  `add_bias_kv` appends one learned key/value token (torch's `add_bias_kv`, used by ImageBind).
  """
  num_heads: int
  head_dim: int
  qkv_bias: Sequence[bool] = (True, True, True)
  out_bias: bool = True
  add_bias_kv: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer | None = None

  @nn.compact
  def __call__(self, x: jax.Array, memory: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    memory = x if memory is None else memory
    heads = (self.num_heads, self.head_dim)

    def project(name, inputs, use_bias):
      return Dense(heads, ("embed", "heads", "head_dim"), use_bias=use_bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)(inputs)

    q_bias, k_bias, v_bias = self.qkv_bias
    q = project("query", x, q_bias)
    k = project("key", memory, k_bias)
    v = project("value", memory, v_bias)
    if self.add_bias_kv:
      k, v, mask = self._append_bias_kv(k, v, mask)
    y = dot_product_attention(q, k, v, mask)
    return Dense(x.shape[-1], ("heads", "head_dim", "embed"), in_dims=2, use_bias=self.out_bias,
                 dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                 name="out")(y)

  def _append_bias_kv(self, k, v, mask):
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("heads", "head_dim"))
    shape = (self.num_heads, self.head_dim)
    bias_k = self.param("bias_k", init, shape, self.param_dtype).astype(self.dtype)
    bias_v = self.param("bias_v", init, shape, self.param_dtype).astype(self.dtype)
    extra = lambda b: jnp.broadcast_to(b, (k.shape[0], 1, *shape))
    k = jnp.concatenate([k, extra(bias_k)], axis=1)
    v = jnp.concatenate([v, extra(bias_v)], axis=1)
    if mask is not None:
      mask = jnp.concatenate([mask, jnp.ones((*mask.shape[:-1], 1), bool)], axis=-1)
    return k, v, mask
