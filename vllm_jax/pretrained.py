"""Model folders: `config.json` + orbax `params/` + tokenizer files, as the converters write them
(LLaMA and Video-LLaMA)."""

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllm_jax.data.tokenizer import load_tokenizer
from vllm_jax.models import video_llama
from vllm_jax.models.llama import Llama, LlamaConfig
from vllm_jax.models.video_llama import VideoLlamaConfig
from vllm_jax.train import sharding
from vllm_jax.train.checkpoint import restore_params, save_params


def save_llama(out_dir: str, config: LlamaConfig, params: Any) -> None:
  os.makedirs(out_dir, exist_ok=True)
  save_params(os.path.join(out_dir, "params"), params)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "llama": config.to_dict()}, f, indent=2)


def load_llama(model_dir: str, mesh: jax.sharding.Mesh | None = None, **overrides):
  """-> (config, params, tokenizer). With a mesh, each tensor is restored straight into its
  shard; `overrides` change config fields such as `dtype`."""
  meta = _read_meta(model_dir)
  if meta.get("model_type") != "llama":
    raise ValueError(f"{model_dir} holds a {meta.get('model_type')!r} model, not a llama one")
  config = LlamaConfig.from_dict(meta["llama"]).replace(**overrides)
  boxed = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  abstract = nn.meta.unbox(boxed)
  if mesh is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, sharding.param_shardings(boxed, mesh))
  params = restore_params(os.path.join(model_dir, "params"), abstract)
  return config, params, load_tokenizer(model_dir)


def save_video_llama(out_dir: str, config: VideoLlamaConfig, params: Any, tokenizer=None) -> None:
  """Write a Video-LLaMA folder: config.json, orbax params/ and tokenizer/ (with the media
  placeholder tokens; in its own folder, where transformers finds no foreign config.json)."""
  os.makedirs(out_dir, exist_ok=True)
  save_params(os.path.join(out_dir, "params"), params)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump({"model_type": "video_llama", "video_llama": config.to_dict()}, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))


def model_type(model_dir: str) -> str:
  """'llama' or 'video_llama': what `vllm-jax convert` wrote in `model_dir`."""
  return _read_meta(model_dir).get("model_type")


def load_video_llama(model_dir: str, mesh: jax.sharding.Mesh | None = None, **llama_overrides):
  """-> (VideoLlamaConfig, params, tokenizer). With a mesh, each tensor is restored straight
  into its shard; `llama_overrides` change LLaMA config fields such as `dtype`."""
  meta = _read_meta(model_dir)
  if meta.get("model_type") != "video_llama":
    raise ValueError(f"{model_dir} holds a {meta.get('model_type')!r} model, not a video_llama one")
  config = VideoLlamaConfig.from_dict(meta["video_llama"])
  config = config.replace(llama=config.llama.replace(**llama_overrides))
  boxed = video_llama.abstract_params(config)
  abstract = nn.meta.unbox(boxed)
  if mesh is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, sharding.param_shardings(boxed, mesh))
  params = restore_params(os.path.join(model_dir, "params"), abstract)
  tokenizer = load_tokenizer(os.path.join(model_dir, "tokenizer"))
  ids = tokenizer.convert_tokens_to_ids(["<ImageHere>", "<AudioHere>"])
  if tuple(ids) != (config.video_token_id, config.audio_token_id):
    raise ValueError(f"the tokenizer in {model_dir} maps <ImageHere>/<AudioHere> to {ids}, the model expects "
                     f"{config.video_token_id}/{config.audio_token_id}")
  return config, params, tokenizer


def _read_meta(model_dir: str) -> dict:
  config_path = os.path.join(model_dir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{model_dir} is not a vllm_jax model folder (no config.json); "
                            "create one with `vllm-jax convert`")
  with open(config_path) as f:
    return json.load(f)
