"""BLIP-2 checkpoints -> Flax: the Q-Former rules (LAVIS and transformers names) and loaders.

Layouts:
  LAVIS `.pth` (`blip2_pretrained*.pth`, `{'model': ...}`): `Qformer.bert.*`, `query_tokens`,
    `ln_vision.*` (and `visual_encoder.*` when the file carries the ViT).
  transformers `Blip2*` folders / state dicts: `qformer.*`, `query_tokens`, `vision_model.*`
    (whose `post_layernorm` is LAVIS's `ln_vision`).
  transformers `InstructBlip*QFormerModel`: as transformers, the norm under `embeddings.`.
A Q-Former with a text path (`vocab_size` > 0) also maps the word and position embeddings and
each layer's text FFN (`intermediate`, `output`).
"""

from vllm_jax.converters.core import IDENTITY, Rule, bias_as, dense
from vllm_jax.models.qformer import QFormerConfig

LAVIS = "lavis"
TRANSFORMERS = "transformers"
INSTRUCTBLIP = "instructblip"
# layout -> (text embeddings prefix, embeddings norm, layer prefix, self/cross-attention child)
LAYOUTS = {
    LAVIS: ("bert.embeddings.", "bert.embeddings.LayerNorm", "bert.encoder.layer.{}.", "self"),
    TRANSFORMERS: ("embeddings.", "layernorm", "encoder.layer.{}.", "attention"),
    INSTRUCTBLIP: ("embeddings.", "embeddings.layernorm", "encoder.layer.{}.", "attention"),
}

# Parts of a BLIP-2 Q-Former that the query-only model does not use: the text path (word and
# position embeddings, the text FFN of every layer, the MLM head) and the heads of the
# pre-training losses and of the language-model adapters.
LAVIS_UNUSED = (
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*",
    r"Qformer\.bert\.embeddings\.position_ids",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",
    r"Qformer\.cls\..*",
    r"(vision_proj|text_proj|itm_head|t5_proj|opt_proj|llm_proj)\..*",
    r"temp",
    r"(t5_model|opt_model|llm_model)\..*",
)
TRANSFORMERS_UNUSED = (
    r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*",
    r"qformer\.embeddings\..*",
    r"language_projection\..*",
    r"language_model\..*",
)


def qformer_rules(config: QFormerConfig, source_prefix: str, target_prefix: str = "",
                  layout: str = LAVIS, query_tokens: str | None = None) -> list[Rule]:
  """Rules for one Q-Former whose keys start with `source_prefix` (e.g. 'Qformer.',
  'video_Qformer.', 'qformer.'); Flax paths start with `target_prefix` (e.g. 'qformer/').
  `query_tokens`: the source key of the learned queries [1, Q, E] (they live outside the
  Q-Former module in every layout), or None when the queries are given at call time."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown Q-Former layout {layout!r}; expected one of {sorted(LAYOUTS)}")
  embeddings, embeddings_norm, layer, attention = LAYOUTS[layout]
  src, dst = source_prefix, target_prefix
  table = norm_rules(src + embeddings_norm, dst + "embeddings_norm")
  text = config.vocab_size > 0
  if text:
    table += [Rule(f"{src}{embeddings}{name}.weight", f"{dst}{name}/embedding")
              for name in ("word_embeddings", "position_embeddings")]
  if query_tokens is not None:
    table.append(Rule(query_tokens, dst + "query_tokens",
                      bias_as((1, config.num_queries, config.hidden_size))))
  for i in range(config.num_layers):
    s, d = src + layer.format(i), f"{dst}layer_{i}/"
    parts = [("attention", "self_attention")]
    if config.has_cross_attention(i):
      parts.append(("crossattention", "cross_attention"))
    for source_part, target_part in parts:
      for name in ("query", "key", "value"):
        table += [Rule(f"{s}{source_part}.{attention}.{name}.weight", f"{d}{target_part}/{name}/kernel", dense()),
                  Rule(f"{s}{source_part}.{attention}.{name}.bias", f"{d}{target_part}/{name}/bias", bias_as())]
      table += [Rule(f"{s}{source_part}.output.dense.weight", f"{d}{target_part}/out/kernel", dense(in_dims=2)),
                Rule(f"{s}{source_part}.output.dense.bias", f"{d}{target_part}/out/bias", IDENTITY)]
      table += norm_rules(f"{s}{source_part}.output.LayerNorm", f"{d}{target_part}_norm")
    table += [Rule(f"{s}intermediate_query.dense.weight", f"{d}query_ffn/fc1/kernel", dense()),
              Rule(f"{s}intermediate_query.dense.bias", f"{d}query_ffn/fc1/bias", IDENTITY),
              Rule(f"{s}output_query.dense.weight", f"{d}query_ffn/fc2/kernel", dense()),
              Rule(f"{s}output_query.dense.bias", f"{d}query_ffn/fc2/bias", IDENTITY)]
    table += norm_rules(f"{s}output_query.LayerNorm", f"{d}query_ffn_norm")
    if text:
      table += [Rule(f"{s}intermediate.dense.weight", f"{d}text_ffn/fc1/kernel", dense()),
                Rule(f"{s}intermediate.dense.bias", f"{d}text_ffn/fc1/bias", IDENTITY),
                Rule(f"{s}output.dense.weight", f"{d}text_ffn/fc2/kernel", dense()),
                Rule(f"{s}output.dense.bias", f"{d}text_ffn/fc2/bias", IDENTITY)]
      table += norm_rules(f"{s}output.LayerNorm", f"{d}text_ffn_norm")
  return table


def norm_rules(source: str, target: str) -> list[Rule]:
  """torch LayerNorm `{source}.weight/.bias` <-> `{target}/scale`, `{target}/bias`."""
  return [Rule(f"{source}.weight", f"{target}/scale"), Rule(f"{source}.bias", f"{target}/bias")]
