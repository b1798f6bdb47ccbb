"""CLIP vision towers -> Flax `ViT` parameters (Video-LLaVA's image and video towers).

Layouts (keys under a prefix, see below):
  transformers `CLIPVisionModel`: embeddings.{class_embedding [D], patch_embedding.weight
    [D, 3, p, p] (no bias), position_embedding.weight [1+G*G, D]}, pre_layrnorm, encoder.layers.{i}.
    {layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}, post_layernorm
  LanguageBind's video tower (`languagebind/video/modeling_video.py`, `add_time_attn`): the same
    names plus, per layer, temporal_embedding [1, T, D], temporal_layer_norm1 and
    temporal_attn.{q,k,v,out}_proj; its embeddings also store the `position_ids` buffer.
Prefixes: `image_tower.vision_model.` / `video_tower.vision_model.` in the Video-LLaVA-7B-hf files
(`model.image_tower.` in a transformers 5 in-memory state dict), `vision_model.` in LanguageBind's.
Video-LLaVA uses layer -2: the model holds `depth` layers, so `clip_unused` ignores the rest.
"""

import re

from vllm_jax.converters.core import CONV, IDENTITY, Rule, bias_as, dense
from vllm_jax.models.vit import CLIP_VIT_L, ViTConfig


def _attention(source: str, target: str, qkv_bias) -> list[Rule]:
  """torch q/k/v/out_proj under `source` -> MultiHeadAttention params under `target`."""
  table = []
  for proj, name, has_bias in zip("qkv", ("query", "key", "value"), qkv_bias):
    table.append(Rule(f"{source}{proj}_proj.weight", f"{target}{name}/kernel", dense()))
    if has_bias:
      table.append(Rule(f"{source}{proj}_proj.bias", f"{target}{name}/bias", bias_as()))
  return table + [Rule(f"{source}out_proj.weight", f"{target}out/kernel", dense(in_dims=2)),
                  Rule(f"{source}out_proj.bias", f"{target}out/bias", IDENTITY)]


def _norm(source: str, target: str) -> list[Rule]:
  return [Rule(source + ".weight", target + "/scale"), Rule(source + ".bias", target + "/bias")]


def vision_rules(config: ViTConfig, prefix: str = "") -> list[Rule]:
  """Rules for a CLIP vision tower whose keys start with `prefix`; LanguageBind's temporal keys
  are added when `config.temporal_frames` is set."""
  p, b = prefix, prefix + "encoder.layers.{i}."
  table = [
      Rule(p + "embeddings.class_embedding", "cls_token"),
      Rule(p + "embeddings.patch_embedding.weight", "patch_embed/kernel", CONV),
      Rule(p + "embeddings.position_embedding.weight", "pos_embed"),
  ]
  if config.patch_bias:
    table.append(Rule(p + "embeddings.patch_embedding.bias", "patch_embed/bias"))
  if config.pre_norm:
    table += _norm(p + "pre_layrnorm", "pre_norm")
  table += _attention(b + "self_attn.", "blocks/attn/", config.qkv_bias)
  table += _norm(b + "layer_norm1", "blocks/norm1") + _norm(b + "layer_norm2", "blocks/norm2")
  for fc in ("fc1", "fc2"):
    table += [Rule(f"{b}mlp.{fc}.weight", f"blocks/mlp/{fc}/kernel", dense()),
              Rule(f"{b}mlp.{fc}.bias", f"blocks/mlp/{fc}/bias")]
  if config.temporal_frames:
    table.append(Rule(b + "temporal_embedding", "blocks/temporal_embedding",
                      bias_as((1, config.temporal_frames, config.width))))
    table += _norm(b + "temporal_layer_norm1", "blocks/temporal_norm")
    table += _attention(b + "temporal_attn.", "blocks/temporal_attn/", (True, True, True))
  if config.final_norm:
    table += _norm(p + "post_layernorm", "norm")
  return table


def clip_unused(prefix: str, depth_total: int, config: ViTConfig = CLIP_VIT_L) -> list[str]:
  """Ignore regexes for the keys of a `depth_total`-layer tower that the model (`config.depth`
  layers) does not hold: the later layers, `post_layernorm` (unless `final_norm`), `position_ids`."""
  p = re.escape(prefix)
  patterns = [p + re.escape(f"encoder.layers.{i}.") + ".*" for i in range(config.depth, depth_total)]
  patterns.append(p + re.escape("embeddings.position_ids"))
  if not config.final_norm:
    patterns.append(p + re.escape("post_layernorm.") + ".*")
  return patterns
