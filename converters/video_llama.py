"""Video-LLaMA vision-language branch: checkpoints -> one Flax params tree, and back.

The branch is assembled from several files, as Video-LLaMA itself loads it:
  eva_vit:   LAVIS `eva_vit_g.pth` (raw ViT keys) -> visual_encoder
  blip2:     LAVIS BLIP-2 `.pth` (`Qformer.*`, `query_tokens`, `ln_vision.*`, maybe `visual_encoder.*`)
             -> qformer, ln_vision (and visual_encoder)
  hf_blip2:  a transformers Blip2 folder or file (`vision_model.*`, `qformer.*`, `query_tokens`)
             -> visual_encoder, ln_vision (= `vision_model.post_layernorm`), qformer
  finetuned: Video-LLaMA VL `.pth` (`video_Qformer.*`, `video_query_tokens`, `video_frame_position_embedding`,
             `llama_proj`) -> video_qformer, frame_position_embedding, llama_proj
`save_finetuned` writes the trainable parts back in the Video-LLaMA finetuned layout.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax import paths
from vllm_jax.converters import blip2 as blip2_format
from vllm_jax.converters import eva_vit as eva_vit_format
from vllm_jax.converters.core import (IDENTITY, Params, Rule, TensorReader, convert, dense, export,
                                      open_checkpoint, set_path)
from vllm_jax.models.video_branch import VideoBranch, VideoBranchConfig

# Keys of a Video-LLaMA finetuned file that are not this branch's parameters: the audio
# branch (its own converter), persistent buffers of frozen modules, LLaMA's rotary tables.
FINETUNED_UNUSED = (
    r"audio_.*",
    r"(video_)?Qformer\.bert\.embeddings\.position_ids",
    r"llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
)


def abstract_params(config: VideoBranchConfig):
  """The branch's parameters as ShapeDtypeStructs, boxed with their logical axis names."""
  size = config.vit.image_size
  frames = jax.ShapeDtypeStruct((1, 1, size, size, 3), jnp.float32)
  return jax.eval_shape(VideoBranch(config).init, jax.random.key(0), frames)["params"]


def eva_vit_rules(config: VideoBranchConfig, source_prefix: str = "") -> list[Rule]:
  return eva_vit_format.vit_rules(config.vit, eva_vit_format.LAVIS, source_prefix, "visual_encoder/")


def blip2_rules(config: VideoBranchConfig, with_vit: bool = False) -> list[Rule]:
  """LAVIS BLIP-2 `.pth`: image Q-Former, query tokens, ln_vision (and the ViT if present)."""
  table = blip2_format.qformer_rules(config.qformer, "Qformer.", "qformer/", blip2_format.LAVIS,
                                    query_tokens="query_tokens")
  table += blip2_format.norm_rules("ln_vision", "ln_vision")
  return table + (eva_vit_rules(config, "visual_encoder.") if with_vit else [])


def hf_blip2_rules(config: VideoBranchConfig) -> list[Rule]:
  """transformers Blip2 state dict: ViT, ln_vision (its `post_layernorm`), image Q-Former."""
  table = eva_vit_format.vit_rules(config.vit, eva_vit_format.TRANSFORMERS, "vision_model.", "visual_encoder/")
  table += blip2_format.norm_rules("vision_model.post_layernorm", "ln_vision")
  return table + blip2_format.qformer_rules(config.qformer, "qformer.", "qformer/", blip2_format.TRANSFORMERS,
                                     query_tokens="query_tokens")


def finetuned_rules(config: VideoBranchConfig) -> list[Rule]:
  """Video-LLaMA's trained VL parameters (the finetuned `.pth` layout)."""
  table = blip2_format.qformer_rules(config.video_qformer, "video_Qformer.", "video_qformer/", blip2_format.LAVIS,
                              query_tokens="video_query_tokens")
  return table + [
      Rule("video_frame_position_embedding.weight", "frame_position_embedding/embedding"),
      Rule("llama_proj.weight", "llama_proj/kernel", dense()),
      Rule("llama_proj.bias", "llama_proj/bias", IDENTITY),
  ]


def load_params(config: VideoBranchConfig, *, eva_vit: str | None = None, blip2: str | None = None,
                hf_blip2: str | None = None, finetuned: str | None = None,
                progress: bool = True) -> Params:
  """Read the given checkpoint files -> the branch's params (numpy), one tensor at a time.

  Every parameter must come from exactly one file; gaps and overlaps are named.
  """
  abstract = nn.meta.unbox(abstract_params(config))
  sources = []
  if eva_vit is not None:
    reader = open_checkpoint(eva_vit, subkey="model")
    sources.append((reader, eva_vit_rules(config), _dropped_blocks(reader, config, ""), "eva_vit"))
  if blip2 is not None:
    reader = open_checkpoint(blip2, subkey="model")
    with_vit = "visual_encoder.cls_token" in reader.keys()
    ignore = blip2_format.LAVIS_UNUSED + tuple(_dropped_blocks(reader, config, "visual_encoder."))
    sources.append((reader, blip2_rules(config, with_vit), ignore, "blip2"))
  if hf_blip2 is not None:
    sources.append((open_checkpoint(hf_blip2, subkey=None), hf_blip2_rules(config),
                    blip2_format.TRANSFORMERS_UNUSED, "hf_blip2"))
  if finetuned is not None:
    sources.append((open_checkpoint(finetuned, subkey="model"), finetuned_rules(config), FINETUNED_UNUSED,
                    "video_llama"))

  params: Params = {}
  owner: dict[str, str] = {}
  for reader, rules, ignore, name in sources:
    part = convert(reader, rules, abstract, ignore=ignore, desc=name, progress=progress)
    for path, value in _leaves(part):
      if path in owner:
        raise ValueError(f"parameter {path} is given by both {owner[path]} and {name}")
      owner[path] = name
      set_path(params, path, value)
  missing = [path for path, _ in _leaves(abstract) if path not in owner]
  if missing:
    raise ValueError(f"no checkpoint provides {len(missing)} parameters: {', '.join(missing)}")
  return params


def save_finetuned(config: VideoBranchConfig, params: Mapping, path: str, dtype=None) -> None:
  """Write the trainable parts (video Q-Former, its queries, frame positions, llama_proj) as a
  Video-LLaMA finetuned `.pth` (`{'model': state_dict}`)."""
  import torch
  state = {key: torch.from_numpy(np.ascontiguousarray(value))
           for key, value in export(params, finetuned_rules(config), dtype=dtype)}
  with paths.local_output(path) as local:
    torch.save({"model": state}, local)


def _dropped_blocks(reader: TensorReader, config: VideoBranchConfig, prefix: str) -> list[str]:
  return eva_vit_format.dropped_blocks(reader.keys(), config.vit, prefix)


def _leaves(tree: Mapping[str, Any], prefix: str = ""):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaves(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value

