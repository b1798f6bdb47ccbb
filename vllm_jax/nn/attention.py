"""Attention: masks, the scaled dot-product kernels, and the encoder multi-head attention.

The decoder attention with RoPE and a KV cache lives with the LLaMA model; it calls
`causal_attention` here, which picks the kernel:
  "xla"     scores materialised as [B, H, T, S] (any mask, any platform);
  "cudnn"   cuDNN's fused flash attention (NVIDIA GPUs, bf16/fp16; rows right-padded);
  "splash"  the Pallas splash-attention kernel (TPU; in interpret mode elsewhere, for tests);
  "auto"    splash on TPU, cuDNN on GPU in bf16/fp16, else XLA.
The fused kernels keep O(T) memory per head instead of O(T x S): what lets long sequences train.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks

from vllm_jax.nn.layers import Dense, Dtype, Initializer

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")
SPLASH_BLOCKS = (512, 256, 128)  # splash's query/key tiles, the largest that divides the length


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention with grouped K/V heads, by XLA.

  q: [B, T, H, D]; k, v: [B, S, K, D] with K dividing H; mask: bool, broadcastable to
  [B, H, T, S] (True = attend). A fully masked row gives a uniform average, never NaN.
  Scores and softmax in float32 (bf16 inputs: bf16 products, f32 sums), as
  `jax.nn.dot_product_attention` computes them. Heads are moved before positions explicitly:
  from the [B, T, H, D] layout, XLA:CPU ran the two batched matmuls 1.5x slower.
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
  k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, S, D]
  precision = {jnp.bfloat16: jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.float16: jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(q.dtype.type)
  logits = jnp.einsum("bkgtd,bksd->bkgts", q, k, precision=precision, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(d ** -0.5)
  if mask is not None:  # -> [B or 1, K or 1, G or 1, T or 1, S or 1], heads split as q's
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    per_head = mask.shape[1] > 1
    mask = mask.reshape(mask.shape[0], kv_heads if per_head else 1, h // kv_heads if per_head else 1, *mask.shape[2:])
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def resolve_implementation(implementation: str | None, q: jax.Array) -> str:
  """"auto" (or None: "xla") -> the kernel for q [B, T, H, D] on the platform of the mesh in context
  (of the default backend without one): the mesh's devices decide, so a step compiled for TPU chips
  on a CPU host gets splash. Auto takes splash only for T a multiple of 128, and cuDNN in bf16/fp16."""
  implementation = implementation or "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl {implementation!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
  if implementation != "auto":
    return implementation
  platform = _platform()
  if platform == "tpu" and q.shape[1] % 128 == 0:
    return "splash"
  if platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def _platform() -> str:
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.abstract_device.platform if not mesh.empty and mesh.abstract_device else jax.default_backend()


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array,
                     query_slots: jax.Array, implementation: str | None = None) -> jax.Array:
  """Causal attention of queries at `query_slots` over keys at slots 0..S-1.

  q: [B, T, H, D]; k, v: [B, S, K, D] (K divides H); key_valid: [B, S] bool; query_slots: [T], or
  [B, T] where each row has its own slots.
  -> [B, T, H, D]. A query attends the valid keys at or before its slot. The fused kernels take
  the training layout (no cache: T == S, query_slots = 0..T-1) and key validity as segments, so
  they agree with XLA on every valid query; cuDNN further needs the valid keys of a row to come
  first (right padding), as training batches and the likelihood scorer lay them out.
  """
  implementation = resolve_implementation(implementation, q)
  if implementation == "xla":
    return dot_product_attention(q, k, v, causal_mask(key_valid, query_slots))
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"the {implementation} kernel attends a whole sequence (no cache): {q.shape[1]} queries, "
                     f"{k.shape[1]} keys")
  if implementation == "cudnn":
    lengths = key_valid.sum(axis=-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                        implementation="cudnn")
  return splash_attention(q, k, v, key_valid)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array) -> jax.Array:
  """Causal splash attention with key validity as segment ids (padding is segment 0, so a valid
  query sees only valid keys). Shapes as `causal_attention`'s, T == S, a multiple of 128 (or
  shorter than that, one tile: in interpret mode off TPU).

  Under a mesh it runs per shard (`shard_map`: batch over data x fsdp, heads over tensor, by the
  logical axis rules), as the kernel works on one device's blocks."""
  length, heads = q.shape[1], q.shape[2]
  block = next((b for b in SPLASH_BLOCKS if length % b == 0), length if length < SPLASH_BLOCKS[-1] else None)
  if block is None:
    raise ValueError(f"splash attention needs the sequence length ({length}) to be a multiple of "
                     f"{SPLASH_BLOCKS[-1]}")
  k, v = (jnp.repeat(x, heads // x.shape[2], axis=2) for x in (k, v))  # the kernel's K/V share no heads
  segments = key_valid.astype(jnp.int32)
  interpret = _platform() != "tpu"

  def per_shard(q, k, v, segments):
    kernel = _splash_kernel(q.shape[2], length, block, interpret)
    to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    ids = splash.SegmentIds(q=segments, kv=segments)
    out = jax.vmap(kernel)(to_heads_first(q * q.shape[-1] ** -0.5), to_heads_first(k), to_heads_first(v),
                           segment_ids=ids)
    return to_heads_first(out)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return per_shard(q, k, v, segments)
  axes = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
  qkv = jax.sharding.PartitionSpec(*axes)
  return jax.shard_map(per_shard, mesh=mesh, in_specs=(qkv, qkv, qkv, jax.sharding.PartitionSpec(*axes[:2])),
                       out_specs=qkv, check_vma=False)(q, k, v, segments)


def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
  """The causal multi-head splash kernel for one device's heads."""
  mask = splash_masks.MultiHeadMask([splash_masks.CausalMask((length, length))] * heads)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def padding_mask(key_valid: jax.Array) -> jax.Array:
  """key_valid: [B, S] bool -> [B, 1, 1, S] (every query sees the valid keys)."""
  return key_valid[:, None, None, :].astype(bool)


def causal_mask(key_valid: jax.Array, query_slots: jax.Array) -> jax.Array:
  """Causal mask over cache slots.

  key_valid: [B, S] bool; query_slots: [T] or [B, T], the slot of each query -> [B, 1, T, S].
  """
  key_slots = jnp.arange(key_valid.shape[-1])
  causal = key_slots <= query_slots[..., None]          # [T, S] or [B, T, S]
  causal = causal[None, None] if causal.ndim == 2 else causal[:, None]
  return causal & key_valid[:, None, None, :].astype(bool)


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
