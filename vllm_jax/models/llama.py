"""LLaMA decoder (LLaMA 1/2/3, Vicuna): RMSNorm, RoPE, SwiGLU, grouped-query attention, KV cache.

Parameters (layers scanned, so each layer tensor has a leading `layers` axis L):
  embed_tokens/embedding [V, E]
  layers/{input_norm, post_attention_norm}/scale [L, E]
  layers/attn/{q [L,E,H,D], k [L,E,K,D], v [L,E,K,D], o [L,H,D,E]}/kernel
  layers/mlp/{gate [L,E,M], up [L,E,M], down [L,M,E]}/kernel
  norm/scale [E]; lm_head/kernel [E, V] (absent when embeddings are tied)
  with `lora`: beside each targeted kernel, lora_a [L, *in, r] and lora_b [L, r, *out]
"""

import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vllm_jax.nn.attention import causal_attention
from vllm_jax.nn.config import ConfigBase
from vllm_jax.nn.layers import Dense, Embed, RMSNorm, constrain
from vllm_jax.nn.lora import LoraConfig
from vllm_jax.nn.rope import RopeConfig, apply_rope, rope_angles


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ConfigBase):
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  dtype: str = "float32"         # compute dtype
  param_dtype: str = "float32"
  remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name, or "none"
  attention_impl: str | None = None       # the kernel without a cache: None (XLA), cudnn, splash, auto
  lora: LoraConfig | None = None          # low-rank adapters on the projections `lora.targets` name
  loss_chunk: int = 0                     # training loss: positions projected to the vocabulary at once; 0: all


def extend_context(config: LlamaConfig, length: int, trained: int = 0) -> LlamaConfig:
  """`config` with a context of `length` positions, reached as LLaMA-VID's training script reaches
  a model_max_length beyond the LLM's: past the positions its RoPE was trained on (`trained`, or
  the config's context when that is larger), positions are interpolated linearly (RoPE `linear`,
  factor ceil(length / trained)). A `length` within the config's context changes nothing.
  `trained` matters when a folder's context is shorter than its RoPE's (a converted LLaMA-VID
  folder's is its model_max_length, 2048, over Vicuna v1.5's 4096 positions)."""
  if length <= config.max_position_embeddings:
    return config
  trained = max(trained, config.max_position_embeddings)
  if length <= trained:
    return config.replace(max_position_embeddings=length)
  if config.rope.type != "default":
    raise ValueError(f"cannot extend the LLM's context of {config.max_position_embeddings} positions to {length}: "
                     f"its RoPE is already scaled ({config.rope.type}, factor {config.rope.factor})")
  rope = dataclasses.replace(config.rope, type="linear", factor=float(math.ceil(length / trained)))
  return config.replace(max_position_embeddings=length, rope=rope)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, written left to right at `index`.

  k, v: [L, B, K, S, D], heads before slots so that a decode step reads each head's keys as one
  contiguous block (slots-first made XLA:CPU transpose the layer's whole cache every step: 2x
  slower decoding at batch 8); valid: [B, S] bool (False for padding and unwritten slots);
  index: the next slot to write: [] int32, the same for the whole batch (prompts left-padded), or
  [B] int32, one per row (the serving engine's slots, each holding its own request).
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, config: LlamaConfig, batch: int, max_len: int, per_row: bool = False) -> "KVCache":
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return cls(k=jnp.zeros(shape, config.dtype), v=jnp.zeros(shape, config.dtype),
               valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((batch,) if per_row else (), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE; x: [B, T, E] -> [B, T, E].

  With a cache ((k, v), each [L, B, K, S, D] for all layers) the new keys/values are written in
  place at (`layer`, `index`) and the queries attend over this layer's whole cache, by XLA (a
  decode step's scores are small); without one `config.attention_impl` picks the kernel.
  key_valid: [B, S] bool; query_slots: [T] or [B, T], the cache slot of each query; index: [] or
  [B], where the new keys go (see `KVCache`).
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, cache, layer, key_valid, query_slots, cos, sin, index):
    cfg = self.config
    dense = lambda heads, name: Dense((heads, cfg.head_dim), ("embed", heads_axis(heads, cfg), "head_dim"),
                                      use_bias=cfg.attention_bias, dtype=cfg.dtype,
                                      param_dtype=cfg.param_dtype, lora=lora_for(cfg, name), name=name)
    q = apply_rope(dense(cfg.num_heads, "q")(x), cos, sin)
    k = apply_rope(dense(cfg.num_kv_heads, "k")(x), cos, sin)
    v = dense(cfg.num_kv_heads, "v")(x)
    if cache is not None:
      def write(buffer, new):  # new: [B, T, K, D] into [L, B, K, S, D]; -> this layer's [B, S, K, D]
        new = new.swapaxes(1, 2)[None].astype(buffer.dtype)
        buffer = write_slots(buffer, new, index, layer)
        return buffer, jax.lax.dynamic_index_in_dim(buffer, layer, keepdims=False).swapaxes(1, 2)
      (cache_k, k), (cache_v, v) = write(cache[0], k), write(cache[1], v)
      cache = (cache_k, cache_v)
    k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    y = causal_attention(q, k.astype(q.dtype), v.astype(q.dtype), key_valid, query_slots,
                         cfg.attention_impl if cache is None else "xla")
    out = Dense(x.shape[-1], ("heads", "head_dim", "embed"), in_dims=2, use_bias=cfg.attention_bias,
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, lora=lora_for(cfg, "o"), name="o")(y)
    return out, cache


def write_slots(buffer: jax.Array, new: jax.Array, index: jax.Array, layer=0) -> jax.Array:
  """`buffer` with `new` written from slot `index` ([]: the same for every row; [B]: one per row):
  a layered cache [L, B, K, S, D] at `layer` (new: [1, B, K, T, D]), or `valid` [B, S] (new: [B, T]).
  Per row it is one scatter (written in place; slots past the end are dropped): a vmapped
  dynamic_update_slice made XLA copy the whole cache several times per layer and step."""
  layered = buffer.ndim == 5
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice(buffer, new, (layer, 0, 0, index, 0) if layered else (0, index))
  rows = jnp.arange(index.shape[0])[:, None]
  slots = index[:, None] + jnp.arange(new.shape[-2 if layered else -1])  # [B, T]
  if layered:
    return buffer.at[layer, rows, :, slots].set(new[0].swapaxes(1, 2), mode="drop")  # [B, T, K, D]
  return buffer.at[rows, slots].set(new, mode="drop")


def lora_for(cfg: LlamaConfig, name: str) -> LoraConfig | None:
  return cfg.lora if cfg.lora is not None and name in cfg.lora.targets else None


def heads_axis(heads: int, cfg: LlamaConfig) -> str:
  return "heads" if heads == cfg.num_heads else "kv_heads"


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)); x: [B, T, E] -> [B, T, E]."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda features, axes, name: Dense(features, axes, use_bias=cfg.mlp_bias, dtype=cfg.dtype,
                                               param_dtype=cfg.param_dtype, lora=lora_for(cfg, name), name=name)
    h = nn.silu(dense(cfg.intermediate_size, ("embed", "mlp"), "gate")(x))
    h = h * dense(cfg.intermediate_size, ("embed", "mlp"), "up")(x)
    h = constrain(h, ("batch", "length", "mlp"))
    return dense(cfg.hidden_size, ("mlp", "embed"), "down")(h)


class DecoderLayer(nn.Module):
  """Pre-norm block. carry = (x [B, T, E], cache or None); `layer` is this layer's index (the
  scanned input); the rest is broadcast to every layer. Suits `nn.scan`."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, carry, layer, key_valid, query_slots, cos, sin, index):
    cfg = self.config
    x, cache = carry
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    h, cache = Attention(cfg, name="attn")(norm("input_norm")(x), cache, layer, key_valid, query_slots, cos, sin,
                                           index)
    x = x + h
    x = x + SwiGLU(cfg, name="mlp")(norm("post_attention_norm")(x))
    return (constrain(x, ("batch", "length", "act_embed")), cache), None


class Llama(nn.Module):
  """The decoder. `__call__` -> (logits [B, T, V], updated cache or None)."""
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    layer = DecoderLayer
    if cfg.remat_policy != "none":
      layer = nn.remat(layer, policy=getattr(jax.checkpoint_policies, cfg.remat_policy), prevent_cse=False)
    self.layers = nn.scan(
        layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = Dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.dtype, param_dtype=cfg.param_dtype)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, T] int -> [B, T, E]: the input embeddings, for splicing in other modalities."""
    return self.embed_tokens(input_ids)

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Run the decoder on token ids or embeddings.

    input_ids: [B, T] or inputs_embeds: [B, T, E]; attention_mask: [B, T] (1 = token,
    0 = padding); positions: [B, T] RoPE positions (by default counted over the unmasked
    tokens, continuing from the cache). With `cache`, the tokens are appended to it.
    """
    x, cache = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  positions=positions, cache=cache)
    return self.logits(x), cache

  def logits(self, x: jax.Array) -> jax.Array:
    """Final hidden states [..., E] -> logits [..., V]."""
    cfg = self.config
    logits = self.embed_tokens.attend(x) if cfg.tie_word_embeddings else self.lm_head(x)
    return constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits

  def hidden_states(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                    attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                    cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """As `__call__`, stopping before the vocabulary: (final normed states [B, T, E], cache), for
    callers that need logits at a few positions or none (a prompt piece filling the cache)."""
    cfg = self.config
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
    batch, length = x.shape[:2]
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), bool)
    attention_mask = attention_mask.astype(bool)
    x = constrain(x, ("batch", "length", "act_embed"))

    if cache is None:
      index, key_valid, layer_cache = jnp.zeros((), jnp.int32), attention_mask, None
      past = jnp.zeros((batch, 1), jnp.int32)
    else:
      index, layer_cache = cache.index, (cache.k, cache.v)
      key_valid = write_slots(cache.valid, attention_mask, index)
      past = cache.valid.sum(axis=-1, keepdims=True, dtype=jnp.int32)
    if positions is None:
      positions = jnp.maximum(past + jnp.cumsum(attention_mask, axis=-1, dtype=jnp.int32) - 1, 0)
    cos, sin = rope_angles(cfg.rope, cfg.head_dim, positions)
    (x, layer_cache), _ = self.layers((x, layer_cache), jnp.arange(cfg.num_layers), key_valid,
                                      index[..., None] + jnp.arange(length), cos, sin, index)
    if cache is not None:
      cache = KVCache(k=layer_cache[0], v=layer_cache[1], valid=key_valid, index=index + length)
    return self.norm(x), cache
