"""Model folders: `config.json` + orbax `params/` + tokenizer files, as the converters write them."""

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllm_jax.data.tokenizer import load_tokenizer
from vllm_jax.models.llama import Llama, LlamaConfig
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
  config_path = os.path.join(model_dir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{model_dir} is not a vllm_jax model folder (no config.json); "
                            "create one with `vllm-jax convert llama`")
  with open(config_path) as f:
    meta = json.load(f)
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
