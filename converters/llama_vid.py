"""LLaMA-VID checkpoints (the reference's `LlavaLlamaAttForCausalLM` folders) <-> (LlamaVidConfig, Flax params).

Layout: a folder with config.json, weights as `pytorch_model-*.bin` + `pytorch_model.bin.index.json`
(or safetensors) and the LLaMA tokenizer files. Its keys:
  model.embed_tokens, model.layers.{i}.*, model.norm, lm_head        -> llm/        (`converters.llama`)
  model.vision_tower.vision_tower.*  (EVA ViT-g, LAVIS names)        -> vision/     (`converters.eva_vit`)
  model.vlm_att_ln.{weight, bias}                                    -> att_norm/
  model.vlm_att_encoder.bert.*  (LAVIS BERT Q-Former, text path too) -> qformer/    (`converters.blip2`)
  model.vlm_att_query [1, Q, 768]                                    -> qformer/query_tokens
  model.vlm_att_projector, vlm_att_key_projector, vlm_att_val_projector (Linear)
                                                                     -> att_projector/, key_projector/, val_projector/
  model.mm_projector.{0, 2}.{weight, bias}  (mlp2x_gelu)             -> projector/fc1, projector/fc2
Skipped on load: the Q-Former's `position_ids` buffer and LLaMA's rotary tables.

Other sources, as the reference loads them:
  eva_vit:  the released folders may lack the vision tower: the reference always reads it from
            LAVIS' `eva_vit_g.pth` (raw ViT keys, 40 blocks of which the first 39 are used). Given,
            it is the tower, and a folder's own `model.vision_tower.vision_tower.*` keys are skipped.
  base_llm: a stage-1 folder holds only `mm_projector.bin` (`model.mm_projector.*`, `model.vlm_att_*`)
            and config.json; the LLaMA weights then come from the base LLaMA/Vicuna folder.

The config comes from config.json: the LLaMA fields, `image_processor` (a path ending in the
input size: clip-patch14-224 or -336), `num_query`, `compress_type` ("mean": one content token;
"grid:k": k x k; null: every patch), and `max_token` (the context the reference serves with; it
becomes `llama.max_position_embeddings`). Accepted but not needed: `bert_type`'s freeze variants
(training only) and `mm_vision_select_layer` (the EVA tower always gives its last block). The
tower and Q-Former sizes are fixed by the architecture (`BASE`). EVA's position table is stored
for 224 px (16 x 16); for another input size it is resized on load as the reference's
`interpolate_pos_embed` does (bicubic), and saved at the model's size.
"""

import json
import math
import os
import re
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from vllm_jax import paths
from vllm_jax.converters import blip2 as blip2_format
from vllm_jax.converters import eva_vit as eva_vit_format
from vllm_jax.converters import llama as llama_format
from vllm_jax.converters.core import (IDENTITY, Params, Rule, TensorReader, convert, dense, export,
                                      open_checkpoint, write_safetensors_shards)
from vllm_jax.converters.video_llava import prefixed
from vllm_jax.models.llama_vid import LlamaVidConfig, abstract_params
from vllm_jax.models.vit import ViTConfig, resize_pos_embed

VISION = "model.vision_tower.vision_tower."
QFORMER = "model.vlm_att_encoder."
# The parts config.json does not describe: EVA ViT-g and the BERT-base Q-Former with its text path.
BASE = LlamaVidConfig()
BERT_TYPES = ("qformer_pretrain", "qformer_pretrain_freeze", "qformer_pretrain_freeze_all")  # `freeze`: training only
IGNORED = (re.escape(QFORMER + "bert.embeddings.position_ids"), *llama_format.IGNORED)


# ---------------------------------------------------------------------------------------------
# Rules.


def linear(source: str, target: str) -> list[Rule]:
  """torch Linear `{source}.weight/.bias` <-> `{target}/kernel`, `{target}/bias`."""
  return [Rule(f"{source}.weight", f"{target}/kernel", dense()), Rule(f"{source}.bias", f"{target}/bias", IDENTITY)]


def rules(config: LlamaVidConfig, vit: ViTConfig | None = None) -> list[Rule]:
  """Every parameter of the model with its source key; `vit`: the tower as the checkpoint stores
  it (its position table's grid), by default `config.vit`."""
  table = eva_vit_format.vit_rules(vit or config.vit, eva_vit_format.LAVIS, VISION, "vision/")
  table += blip2_format.norm_rules("model.vlm_att_ln", "att_norm")
  table += blip2_format.qformer_rules(config.qformer, QFORMER, "qformer/", blip2_format.LAVIS,
                                     query_tokens="model.vlm_att_query")
  table += linear("model.vlm_att_projector", "att_projector")
  table += linear("model.vlm_att_key_projector", "key_projector")
  table += linear("model.vlm_att_val_projector", "val_projector")
  table += linear("model.mm_projector.0", "projector/fc1") + linear("model.mm_projector.2", "projector/fc2")
  return table + prefixed(llama_format.rules(config.llama), "llm/")


def unused(config: LlamaVidConfig, keys: Iterable[str]) -> list[str]:
  """Ignore regexes: buffers, rotary tables, EVA blocks past the depth, a tied head."""
  patterns = [*IGNORED, *eva_vit_format.dropped_blocks(keys, config.vit, VISION)]
  if config.llama.tie_word_embeddings:
    patterns.append(r"lm_head\.weight")
  return patterns


# ---------------------------------------------------------------------------------------------
# Configs.


def config_from_hf(hf: Mapping[str, Any], base: LlamaVidConfig | None = None, **overrides) -> LlamaVidConfig:
  """LlamaVidConfig from a LLaMA-VID config.json dict; `base` gives the tower and Q-Former sizes
  (default `BASE`), `overrides` any other field (e.g. image_token_id)."""
  base = BASE if base is None else base
  projector = hf.get("mm_projector_type", "linear")
  if projector != "mlp2x_gelu":
    raise ValueError(f"unsupported mm_projector_type {projector!r}: LLaMA-VID's projector is mlp2x_gelu")
  if hf.get("bert_type") not in BERT_TYPES:
    raise ValueError(f"unsupported bert_type {hf.get('bert_type')!r}: only the pre-trained Q-Former with "
                     f"vlm_att_ln is supported ({', '.join(BERT_TYPES)})")
  if hf.get("mm_hidden_size", base.vit.width) != base.vit.width:
    raise ValueError(f"mm_hidden_size {hf['mm_hidden_size']}: only the EVA ViT-g tower (width {base.vit.width}) is "
                     "supported; other towers need vlm_att_bert_proj")
  if hf.get("mm_vision_select_feature", "patch") != "patch":
    raise ValueError(f"unsupported mm_vision_select_feature {hf['mm_vision_select_feature']!r} (expected 'patch')")
  if hf.get("mm_use_im_start_end"):
    raise ValueError("mm_use_im_start_end is not supported: prompts hold the <image> run alone")
  vit = base.vit.replace(image_size=_image_size(hf.get("image_processor"), base.vit.image_size))
  llama = llama_format.config_from_hf(hf)
  context = hf.get("max_token") or hf.get("model_max_length")
  if context:
    llama = llama.replace(max_position_embeddings=context)
  qformer = base.qformer.replace(num_queries=hf.get("num_query", 32))
  fields = dict(llama=llama, vit=vit, qformer=qformer, content_grid=_content_grid(hf.get("compress_type"), vit.grid))
  return base.replace(**{**fields, **overrides})


def config_to_hf(config: LlamaVidConfig) -> dict[str, Any]:
  """The reference's config.json (`LlavaLlamaAttForCausalLM`) of a model."""
  vit, llama = config.vit, config.llama
  hf = llama_format.config_to_hf(llama)
  if llama.rope.type == "linear":  # the transformers 4 name the reference reads
    hf["rope_scaling"] = {"type": "linear", "factor": llama.rope.factor}
  if config.content_grid in (0, 1):
    compress = "mean"
  else:
    compress = None if config.content_grid == vit.grid else f"grid:{config.content_grid}"
  hf.update({
      "architectures": ["LlavaLlamaAttForCausalLM"], "model_type": "llava",
      "mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth",
      "image_processor": f"./llamavid/processor/clip-patch{vit.patch_size}-{vit.image_size}",
      "mm_hidden_size": vit.width, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
      "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
      "use_mm_proj": True, "bert_type": "qformer_pretrain", "num_query": config.qformer.num_queries,
      "compress_type": compress, "max_token": llama.max_position_embeddings,
  })
  return hf


def read_config(model_dir: str, *, base: LlamaVidConfig | None = None, param_dtype: str | None = None,
                **overrides) -> LlamaVidConfig:
  """The config of a LLaMA-VID folder (its config.json), parameters in `param_dtype` if given."""
  config = config_from_hf(paths.read_json(paths.join(model_dir, "config.json")), base, **overrides)
  return config if param_dtype is None else with_param_dtype(config, param_dtype)


def with_param_dtype(config: LlamaVidConfig, param_dtype: str) -> LlamaVidConfig:
  return config.replace(llama=config.llama.replace(param_dtype=param_dtype),
                        vit=config.vit.replace(param_dtype=param_dtype),
                        qformer=config.qformer.replace(param_dtype=param_dtype))


def _image_size(processor: str | None, default: int) -> int:
  if processor is None:
    return default
  match = re.search(r"-(\d+)$", os.path.basename(processor.rstrip("/")))
  if not match:
    raise ValueError(f"image_processor {processor!r}: cannot tell the input size (expected a path ending in "
                     "clip-patch14-224 or clip-patch14-336)")
  return int(match.group(1))


def _content_grid(compress: str | None, grid: int) -> int:
  """compress_type -> content_grid: "mean" 0, "grid:k" k, None (no pooling) the patch grid."""
  if compress is None:
    return grid
  if compress == "mean":
    return 0
  match = re.fullmatch(r"grid:(\d+)", compress)
  if not match or int(match.group(1)) < 2:
    raise ValueError(f"unsupported compress_type {compress!r} (expected 'mean', 'grid:k' with k >= 2, or null)")
  return int(match.group(1))


# ---------------------------------------------------------------------------------------------
# Reading.


class MergedReader:
  """Several readers as one: each source's keys, with a prefix, under one name space (a key two
  sources give is an error)."""

  def __init__(self):
    self._where: dict[str, tuple[TensorReader, str, str]] = {}

  def add(self, reader: TensorReader, name: str, prefix: str = "", skip: str | None = None) -> None:
    """The keys of `reader` (called `name` in errors) as `prefix + key`, less those starting with `skip`."""
    for key in reader.keys():
      if skip is not None and key.startswith(skip):
        continue
      if prefix + key in self._where:
        raise ValueError(f"{prefix + key} is given by both {self._where[prefix + key][2]} and {name}")
      self._where[prefix + key] = (reader, key, name)

  def keys(self):
    return list(self._where)

  def shape(self, key):
    reader, own, _ = self._where[key]
    return reader.shape(own)

  def read(self, key):
    reader, own, _ = self._where[key]
    return reader.read(own)


def open_sources(model_dir: str, *, eva_vit: str | None = None, base_llm: str | None = None) -> TensorReader:
  """The folder's tensors, the vision tower read from `eva_vit` and the LLaMA from `base_llm` when given."""
  folder = open_checkpoint(model_dir, subkey=None)
  keys = folder.keys()
  if eva_vit is None and not any(k.startswith(VISION) for k in keys):
    raise ValueError(f"{model_dir} holds no vision tower ({VISION}*): the reference reads it from LAVIS' "
                     "eva_vit_g.pth; give that file (--eva-vit)")
  if base_llm is None and "model.embed_tokens.weight" not in keys:
    raise ValueError(f"{model_dir} holds no LLaMA weights (model.embed_tokens.weight): a stage-1 folder "
                     "(mm_projector.bin)? give the base LLaMA/Vicuna folder (--base-llm)")
  merged = MergedReader()
  merged.add(folder, model_dir, skip=VISION if eva_vit else None)
  if eva_vit is not None:
    merged.add(open_checkpoint(eva_vit, subkey="model"), eva_vit, prefix=VISION)
  if base_llm is not None:
    merged.add(open_checkpoint(base_llm, subkey=None), base_llm)
  return merged


def stored_vit(reader: TensorReader, vit: ViTConfig) -> ViTConfig:
  """`vit` at the input size its stored position table was made for (`vit` when absent or odd:
  the check then names the key)."""
  key = VISION + "pos_embed"
  shape = reader.shape(key) if key in reader.keys() else ()
  if len(shape) != 3:
    return vit
  grid = math.isqrt(shape[1] - 1)
  if grid * grid != shape[1] - 1:
    raise ValueError(f"{key} has {shape[1]} positions: not a CLS token and a square grid")
  return vit.replace(image_size=grid * vit.patch_size)


def convert_checkpoint(reader: TensorReader, config: LlamaVidConfig, *, progress: bool = True) -> Params:
  """LLaMA-VID tensors -> params (numpy). Every key is checked first: missing, unexpected and
  mis-shaped ones are named together. A position table stored for another grid is resized."""
  vit = stored_vit(reader, config.vit)
  abstract = nn.meta.unbox(abstract_params(config))
  target = abstract["vision"]["pos_embed"]
  abstract["vision"]["pos_embed"] = jax.ShapeDtypeStruct((1 + vit.grid ** 2, vit.width), target.dtype)
  params = convert(reader, rules(config, vit), abstract, ignore=unused(config, reader.keys()),
                   desc="llama-vid", progress=progress)
  if vit.grid != config.vit.grid:
    pos = resize_pos_embed(jnp.asarray(params["vision"]["pos_embed"], jnp.float32), vit.grid,
                           (config.vit.grid, config.vit.grid))
    params["vision"]["pos_embed"] = np.asarray(pos).astype(target.dtype)
  return params


def load_hf(model_dir: str, *, eva_vit: str | None = None, base_llm: str | None = None,
            base: LlamaVidConfig | None = None, param_dtype: str | None = None, progress: bool = True,
            **overrides) -> tuple[LlamaVidConfig, Params]:
  """A LLaMA-VID folder (plus eva_vit_g.pth / the base LLaMA folder, see the module docstring)
  -> (config, params as numpy arrays), one tensor at a time."""
  config = read_config(model_dir, base=base, param_dtype=param_dtype, **overrides)
  reader = open_sources(model_dir, eva_vit=eva_vit, base_llm=base_llm)
  return config, convert_checkpoint(reader, config, progress=progress)


# ---------------------------------------------------------------------------------------------
# Writing.


def save_hf(config: LlamaVidConfig, params: Mapping, out_dir: str, *, dtype=None, safetensors: bool = False,
            tokenizer_dir: str | None = None, max_shard_bytes: int = 4 << 30) -> None:
  """Write the reference's folder: config.json, every tensor (the vision tower too) as
  `pytorch_model-*.bin` shards with `pytorch_model.bin.index.json` (which the reference's
  loader reads), or safetensors shards; the tokenizer files of `tokenizer_dir`."""
  with paths.local_output(out_dir) as local:  # shards are renamed into place once all are written
    paths.write_json(paths.join(local, "config.json"), config_to_hf(config))
    tensors = export(params, rules(config), dtype=dtype)
    if safetensors:
      write_safetensors_shards(tensors, local, max_shard_bytes)
    else:
      write_torch_shards(tensors, local, max_shard_bytes)
  if tokenizer_dir is not None:
    llama_format.copy_tokenizer(tokenizer_dir, out_dir)


def write_torch_shards(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str,
                       max_shard_bytes: int = 4 << 30) -> list[str]:
  """Stream tensors into `pytorch_model-0000i-of-0000N.bin` state dicts and their index (written
  even for one shard) in a local folder; at most one shard is held in memory."""
  import torch
  shards: list[list[str]] = []
  pending: dict[str, torch.Tensor] = {}
  size = total = 0

  def flush():
    nonlocal pending, size
    if pending:
      torch.save(pending, os.path.join(out_dir, f"pytorch_model-part{len(shards)}.tmp"))
      shards.append(list(pending))
      pending, size = {}, 0

  for name, arr in tensors:
    if size and size + arr.nbytes > max_shard_bytes:
      flush()
    arr = np.require(arr, requirements=["C", "W"])  # torch wants writable memory
    if arr.dtype == ml_dtypes.bfloat16:
      pending[name] = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    else:
      pending[name] = torch.from_numpy(arr)
    size += arr.nbytes
    total += arr.nbytes
  flush()
  names = [f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin" for i in range(len(shards))]
  for i, name in enumerate(names):
    os.replace(os.path.join(out_dir, f"pytorch_model-part{i}.tmp"), os.path.join(out_dir, name))
  weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
  with open(os.path.join(out_dir, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names
