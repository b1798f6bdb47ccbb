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

With an instruction (InstructBLIP, LLaMA-VID: `vocab_size` > 0), its tokens follow the queries:

  out = model.apply({"params": params}, memory, text_ids=ids, text_mask=mask)  # ids, mask: [B, L]

one bidirectional self-attention spans [queries + text] (padded text keys masked); the text
goes through a text FFN beside the query FFN and never reads the memory.

Parameters (layers unrolled: they come in two kinds, with and without cross-attention):
  query_tokens [Q, E]; embeddings_norm/{scale, bias} [E]
  word_embeddings/embedding [V, E], position_embeddings/embedding [P, E] (text path)
  layer_{i}/self_attention/{query, key, value}/{kernel [E,H,D], bias [H,D]}, out/{kernel [H,D,E], bias [E]}
  layer_{i}/self_attention_norm/{scale, bias}
  layer_{i}/cross_attention/... (key/value kernels [E_m,H,D]), layer_{i}/cross_attention_norm (cross layers)
  layer_{i}/query_ffn/{fc1 [E,M], fc2 [M,E]}/{kernel, bias}; layer_{i}/query_ffn_norm/{scale, bias}
  layer_{i}/text_ffn/..., layer_{i}/text_ffn_norm/... (text path)
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllm_jax.nn.attention import MultiHeadAttention, padding_mask
from vllm_jax.nn.config import ConfigBase
from vllm_jax.nn.layers import Embed, LayerNorm, Mlp, constrain


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
  vocab_size: int = 0                  # > 0: the text path (instruction tokens after the queries)
  max_position_embeddings: int = 512   # text positions (text path)
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
  [B, H, T, T] -> x updated [B, T, E]. Self-attention spans all T tokens; cross-attention and
  the query FFN update the queries, the text FFN the tokens after them."""
  config: QFormerConfig
  cross_attention: bool

  @nn.compact
  def __call__(self, x, memory, memory_mask, self_mask, num_queries):
    cfg = self.config
    norm = lambda name: LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    attention = lambda name: MultiHeadAttention(cfg.num_heads, cfg.head_dim, dtype=cfg.dtype,
                                                param_dtype=cfg.param_dtype, name=name)
    ffn = lambda name, h: norm(name + "_norm")(h + Mlp(cfg.intermediate_size, dtype=cfg.dtype,
                                                       param_dtype=cfg.param_dtype, name=name)(h))
    x = norm("self_attention_norm")(x + attention("self_attention")(x, mask=self_mask))
    queries = x[:, :num_queries]
    if self.cross_attention:
      h = attention("cross_attention")(queries, memory, mask=memory_mask)
      queries = norm("cross_attention_norm")(queries + h)
    queries = constrain(ffn("query_ffn", queries), ("batch", "queries", "act_embed"))
    if x.shape[1] == num_queries:
      return queries
    text = constrain(ffn("text_ffn", x[:, num_queries:]), ("batch", "length", "act_embed"))
    return jnp.concatenate([queries, text], axis=1)


class QFormer(nn.Module):
  """Learned queries (or given `query_embeds`), and an instruction after them if given, attending
  to `memory` -> the queries' outputs [B, Q, E]."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, memory: jax.Array, memory_mask: jax.Array | None = None, *,
               query_embeds: jax.Array | None = None, text_ids: jax.Array | None = None,
               text_mask: jax.Array | None = None) -> jax.Array:
    """memory: [B, S, encoder_width]; memory_mask: [B, S] bool (False = padding);
    query_embeds: [B, Q, E] replaces the learned query tokens (e.g. with offsets added);
    text_ids, text_mask: [B, L] the instruction's tokens (text path only) and their validity."""
    cfg = self.config
    if memory.shape[-1] != cfg.encoder_width:
      raise ValueError(f"memory width {memory.shape[-1]} != encoder_width {cfg.encoder_width}")
    if (text_ids is not None) != (cfg.vocab_size > 0):
      raise ValueError("text_ids are needed exactly when the config has a text path (vocab_size > 0)")
    if query_embeds is None:
      tokens = self.param("query_tokens", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("queries", "embed")),
          (cfg.num_queries, cfg.hidden_size), cfg.param_dtype)
      query_embeds = jnp.broadcast_to(tokens, (memory.shape[0], *tokens.shape))
    num_queries, x, self_mask = query_embeds.shape[1], query_embeds, None
    if text_ids is not None:
      # Not split over `vocab`: BERT's 30,523 words divide by no tensor-parallel size (and the table is small).
      embed = lambda n, name: Embed(n, cfg.hidden_size, axes=(None, "embed"), dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype, name=name)
      text = embed(cfg.vocab_size, "word_embeddings")(text_ids)
      text = text + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(text_ids.shape[1]))
      x = jnp.concatenate([x.astype(text.dtype), text], axis=1)
      text_mask = jnp.ones(text_ids.shape, bool) if text_mask is None else text_mask.astype(bool)
      self_mask = padding_mask(jnp.concatenate([jnp.ones(query_embeds.shape[:2], bool), text_mask], axis=1))
    x = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="embeddings_norm")(x)
    x = constrain(x, ("batch", "length", "act_embed"))
    memory = memory.astype(cfg.dtype)
    mask = None if memory_mask is None else padding_mask(memory_mask)
    layer = QFormerLayer
    if cfg.remat_policy != "none":
      # The layers are unrolled, and may be recomputed inside an outer remat (LLaMA-VID's turns):
      # without the barrier XLA merges a layer's rerun with the outer one and keeps its activations.
      layer = nn.remat(layer, policy=getattr(jax.checkpoint_policies, cfg.remat_policy),
                       prevent_cse=True, static_argnums=(5,))
    for i in range(cfg.num_layers):
      x = layer(cfg, cfg.has_cross_attention(i), name=f"layer_{i}")(x, memory, mask, self_mask, num_queries)
    return x[:, :num_queries]
