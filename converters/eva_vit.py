"""EVA ViT checkpoints -> Flax `ViT` parameters.

Layouts:
  LAVIS (`eva_vit_g.pth`, raw keys; inside BLIP-2 / Video-LLaMA files under `visual_encoder.`):
    cls_token [1,1,D], pos_embed [1,N,D], patch_embed.proj.*, blocks.{i}.{norm1, attn.qkv.weight
    [3D,D], attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}
  transformers (`Blip2VisionModel`, under `vision_model.`): embeddings.{class_embedding,
    position_embedding, patch_embedding}, encoder.layers.{i}.{layer_norm1, self_attn.qkv (one
    packed bias = [q_bias, 0, v_bias]), self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}
"""

import re
from typing import Iterable

from vllm_jax.converters.core import CONV, IDENTITY, Rule, bias_as, dense, split
from vllm_jax.models.vit import ViTConfig

LAVIS = "lavis"
TRANSFORMERS = "transformers"


def vit_rules(config: ViTConfig, layout: str = LAVIS, source_prefix: str = "",
              target_prefix: str = "") -> list[Rule]:
  """Rules for a ViT whose keys start with `source_prefix` ('', 'visual_encoder.', 'vision_model.')."""
  if not (config.qkv_bias[0] and not config.qkv_bias[1] and config.qkv_bias[2]):
    raise ValueError(f"EVA checkpoints carry q and v biases only; got qkv_bias={config.qkv_bias}")
  s, d = source_prefix, target_prefix
  tokens = 1 + config.grid * config.grid
  attn = f"{d}blocks/attn/"
  qkv = (attn + "query/kernel", attn + "key/kernel", attn + "value/kernel")
  if layout == LAVIS:
    b = s + "blocks.{i}."
    table = [
        Rule(s + "cls_token", d + "cls_token", bias_as((1, 1, config.width))),
        Rule(s + "pos_embed", d + "pos_embed", bias_as((1, tokens, config.width))),
        Rule(s + "patch_embed.proj.weight", d + "patch_embed/kernel", CONV),
        Rule(s + "patch_embed.proj.bias", d + "patch_embed/bias", IDENTITY),
        Rule(b + "attn.qkv.weight", qkv, split(3, dense())),
        Rule(b + "attn.q_bias", attn + "query/bias", bias_as()),
        Rule(b + "attn.v_bias", attn + "value/bias", bias_as()),
        Rule(b + "attn.proj.weight", attn + "out/kernel", dense(in_dims=2)),
        Rule(b + "attn.proj.bias", attn + "out/bias", IDENTITY),
    ]
    names = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}
    final_norm = s + "norm"
  elif layout == TRANSFORMERS:
    b = s + "encoder.layers.{i}."
    table = [
        Rule(s + "embeddings.class_embedding", d + "cls_token", bias_as((1, 1, config.width))),
        Rule(s + "embeddings.position_embedding", d + "pos_embed", bias_as((1, tokens, config.width))),
        Rule(s + "embeddings.patch_embedding.weight", d + "patch_embed/kernel", CONV),
        Rule(s + "embeddings.patch_embedding.bias", d + "patch_embed/bias", IDENTITY),
        Rule(b + "self_attn.qkv.weight", qkv, split(3, dense())),
        Rule(b + "self_attn.qkv.bias", (attn + "query/bias", attn + "value/bias"),  # [q_bias, 0, v_bias]
             split(3, bias_as(), keep=(0, 2))),
        Rule(b + "self_attn.projection.weight", attn + "out/kernel", dense(in_dims=2)),
        Rule(b + "self_attn.projection.bias", attn + "out/bias", IDENTITY),
    ]
    names = {"layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}
    final_norm = s + "post_layernorm"
  else:
    raise ValueError(f"unknown ViT layout {layout!r}; expected {LAVIS!r} or {TRANSFORMERS!r}")
  for source, target in names.items():
    if source.startswith("mlp"):
      table.append(Rule(f"{b}{source}.weight", f"{d}blocks/{target}/kernel", dense()))
    else:
      table.append(Rule(f"{b}{source}.weight", f"{d}blocks/{target}/scale"))
    table.append(Rule(f"{b}{source}.bias", f"{d}blocks/{target}/bias"))
  if config.final_norm:
    table += [Rule(final_norm + ".weight", d + "norm/scale"), Rule(final_norm + ".bias", d + "norm/bias")]
  return table


def dropped_blocks(keys: Iterable[str], config: ViTConfig, source_prefix: str = "") -> list[str]:
  """Ignore patterns for blocks past `config.depth` (EVA-g has 40 blocks; BLIP-2 uses 39)."""
  pattern = re.compile(re.escape(source_prefix) + r"blocks\.(\d+)\.")
  extra = sorted({int(m.group(1)) for k in keys if (m := pattern.match(k)) and int(m.group(1)) >= config.depth})
  return [re.escape(f"{source_prefix}blocks.{i}.") + ".*" for i in extra]
