"""Q-Former (BLIP-2): learned queries that read an encoder memory through BERT layers.

Each layer is post-norm BERT: self-attention over the queries, then (every
`cross_attention_frequency`-th layer, starting at layer 0) cross-attention to the memory,
then the query feed-forward path. The memory width may differ from the hidden width.

Usage (the image Q-Former of BLIP-2; the Audio Q-Former of Video-LLaMA is
`QFormerConfig(num_layers=2, cross_attention_frequency=1, encoder_width=1024, num_queries=8)`):

  cfg = QFormerConfig(encoder_width=1408)
  model = QFormer(cfg)
  params = model.init(jax.random.key(0), memory)["params"]    # memory: [B, S, 1408]
  out = model.apply({"params": params}, memory, memory_mask)  # memory_mask: [B, S] bool or None
  # out: [B, 32, 768]

Parameters (layers unrolled: they come in two kinds, with and without cross-attention):
  query_tokens [Q, E]; embeddings_norm/{scale, bias} [E]
  layer_{i}/self_attention/{query, key, value}/{kernel [E,H,D], bias [H,D]}, out/{kernel [H,D,E], bias [E]}
  layer_{i}/self_attention_norm/{scale, bias}
  layer_{i}/cross_attention/... (key/value kernels [E_m,H,D]), layer_{i}/cross_attention_norm (cross layers)
  layer_{i}/query_ffn/{fc1 [E,M], fc2 [M,E]}/{kernel, bias}; layer_{i}/query_ffn_norm/{scale, bias}

The sequence a layer runs on is kept separate from the queries it updates with cross-attention
and the query FFN (`num_queries`), so instruction tokens appended after the queries (the text
path of InstructBLIP / LLaMA-VID) add a text FFN beside `query_ffn` rather than a new layer.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllm_jax.nn.attention import MultiHeadAttention, padding_mask
from vllm_jax.nn.config import ConfigBase
from vllm_jax.nn.layers import LayerNorm, Mlp, constrain


@dataclasses.dataclass(frozen=True)
class QFormerConfig(ConfigBase):
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  encoder_width: int = 1408            # width of the memory read by cross-attention
  cross_attention_frequency: int = 2   # cross-attention in layers 0, f, 2f, ...
  num_queries: int = 32
  layer_norm_eps: float = 1e-12
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"           # a jax.checkpoint_policies name, or "none"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def has_cross_attention(self, layer: int) -> bool:
    return layer % self.cross_attention_frequency == 0

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
    if self.cross_attention_frequency < 1:
      raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")


class QFormerLayer(nn.Module):
  """x: [B, T, E], queries first; memory: [B, S, E_m]; masks broadcastable to [B, H, T, S] and
  [B, H, T, T] -> the updated queries [B, num_queries, E]. Self-attention spans all T tokens;
  cross-attention and the query FFN update the queries only."""
  config: QFormerConfig
  cross_attention: bool

  @nn.compact
  def __call__(self, x, memory, memory_mask, self_mask, num_queries):
    cfg = self.config
    norm = lambda name: LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    attention = lambda name: MultiHeadAttention(cfg.num_heads, cfg.head_dim, dtype=cfg.dtype,
                                                param_dtype=cfg.param_dtype, name=name)
    x = norm("self_attention_norm")(x + attention("self_attention")(x, mask=self_mask))
    queries = x[:, :num_queries]
    if self.cross_attention:
      h = attention("cross_attention")(queries, memory, mask=memory_mask)
      queries = norm("cross_attention_norm")(queries + h)
    h = Mlp(cfg.intermediate_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="query_ffn")(queries)
    queries = norm("query_ffn_norm")(queries + h)
    return constrain(queries, ("batch", "queries", "act_embed"))


class QFormer(nn.Module):
  """Learned queries (or given `query_embeds`) attending to `memory` -> [B, Q, E]."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, memory: jax.Array, memory_mask: jax.Array | None = None, *,
               query_embeds: jax.Array | None = None) -> jax.Array:
    """memory: [B, S, encoder_width]; memory_mask: [B, S] bool (False = padding);
    query_embeds: [B, Q, E] replaces the learned query tokens (e.g. with offsets added)."""
    cfg = self.config
    if memory.shape[-1] != cfg.encoder_width:
      raise ValueError(f"memory width {memory.shape[-1]} != encoder_width {cfg.encoder_width}")
    if query_embeds is None:
      tokens = self.param("query_tokens", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("queries", "embed")),
          (cfg.num_queries, cfg.hidden_size), cfg.param_dtype)
      query_embeds = jnp.broadcast_to(tokens, (memory.shape[0], *tokens.shape))
    x = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  name="embeddings_norm")(query_embeds)
    x = constrain(x, ("batch", "queries", "act_embed"))
    memory = memory.astype(cfg.dtype)
    mask = None if memory_mask is None else padding_mask(memory_mask)
    layer = QFormerLayer
    if cfg.remat_policy != "none":
      layer = nn.remat(layer, policy=getattr(jax.checkpoint_policies, cfg.remat_policy),
                       prevent_cse=False, static_argnums=(5,))
    for i in range(cfg.num_layers):
      x = layer(cfg, cfg.has_cross_attention(i), name=f"layer_{i}")(x, memory, mask, None, x.shape[1])
    return x
