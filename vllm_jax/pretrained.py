"""Model folders: `config.json` (naming the `model_type`) + orbax `params/` + tokenizer files, as
the converters and training write them; local or stored (any `vllm_jax.paths` path)."""

import math
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from vllm_jax import paths, quiet
from vllm_jax.data.tokenizer import has_tokenizer, load_tokenizer, save_tokenizer
from vllm_jax.models.llama import Llama, LlamaConfig
from vllm_jax.train import sharding
from vllm_jax.train.checkpoint import save_params


def save_llama(out_dir: str, config: LlamaConfig, params: Any, write_params: Callable = save_params) -> None:
  """`write_params(path, params)` writes params/ (the streaming converter passes its own writer)."""
  write_params(paths.join(out_dir, "params"), params)
  paths.write_json(paths.join(out_dir, "config.json"), {"model_type": "llama", "llama": config.to_dict()})


def load_llama(model_dir: str, mesh: jax.sharding.Mesh | None = None, **overrides):
  """-> (config, params, tokenizer, or None when the folder holds none). With a mesh, each tensor
  is restored straight into its shard; `overrides` change config fields such as `dtype`."""
  meta = _read_meta(model_dir)
  if meta.get("model_type") != "llama":
    raise ValueError(f"{model_dir} holds a {meta.get('model_type')!r} model, not a llama one")
  config = LlamaConfig.from_dict(meta["llama"]).replace(**overrides)
  boxed = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  abstract = nn.meta.unbox(boxed)
  if mesh is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, sharding.param_shardings(boxed, mesh))
  params = restore_with_progress(paths.join(model_dir, "params"), abstract, model_dir)
  return config, params, load_tokenizer(model_dir) if has_tokenizer(model_dir) else None


def save(out_dir: str, model_type: str, config, params: Any, tokenizer=None) -> None:
  """Write a model folder: config.json (`model_type` and the config), orbax params/ and
  tokenizer/ (with the media placeholder tokens; in its own folder, where transformers finds no
  foreign config.json)."""
  save_params(paths.join(out_dir, "params"), params)
  paths.write_json(paths.join(out_dir, "config.json"), {"model_type": model_type, model_type: config.to_dict()})
  if tokenizer is not None:
    save_tokenizer(tokenizer, paths.join(out_dir, "tokenizer"))


def load(model_dir: str, model_type: str, config_class, abstract_params: Callable,
         mesh: jax.sharding.Mesh | None = None, **llama_overrides):
  """-> (config, params, tokenizer) of a folder written by `save`. With a mesh, each tensor is
  restored straight into its shard; `llama_overrides` change LLaMA config fields such as `dtype`."""
  config = read_config(model_dir, model_type, config_class)
  config = config.replace(llama=config.llama.replace(**llama_overrides))
  boxed = abstract_params(config)
  abstract = nn.meta.unbox(boxed)
  if mesh is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, sharding.param_shardings(boxed, mesh))
  params = restore_with_progress(paths.join(model_dir, "params"), abstract, model_dir)
  return config, params, load_tokenizer(paths.join(model_dir, "tokenizer"))


def read_config(model_dir: str, model_type: str, config_class):
  """The config of a folder written by `save` (no parameters are read); ValueError when the folder
  holds another kind of model."""
  meta = _read_meta(model_dir)
  if meta.get("model_type") != model_type:
    raise ValueError(f"{model_dir} holds a {meta.get('model_type')!r} model, not a {model_type} one")
  return config_class.from_dict(meta[model_type])


def restore_with_progress(path: str, abstract: Any, name: str, steps: int = 50) -> Any:
  """As `train.checkpoint.restore_params`, about 1/`steps` of the bytes at a time, with a progress
  bar on stderr (a 7B model takes minutes to read): process 0 only, none in quiet mode (VLLM_JAX_QUIET=1)."""
  from tqdm import tqdm
  path = paths.resolve(path)  # orbax takes absolute paths and URLs only
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  sizes = [math.prod(a.shape) * a.dtype.itemsize for _, a in leaves]
  restored, group, group_bytes = [], {}, 0
  with ocp.PyTreeCheckpointer() as checkpointer, tqdm(
      total=sum(sizes), desc=f"loading {paths.shown(name)}", unit="B", unit_scale=True, file=sys.stderr,
      disable=quiet() or jax.process_index() != 0) as bar:
    for i, ((key_path, leaf), size) in enumerate(zip(leaves, sizes)):
      _nest(group, key_path, leaf)  # the group's leaves, nested as in the whole tree
      group_bytes += size
      if group_bytes < sum(sizes) / steps and i + 1 < len(leaves):
        continue
      out = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          group, restore_args=ocp.checkpoint_utils.construct_restore_args(group), partial_restore=True))
      restored += jax.tree.leaves(out)  # the group's leaves in flattening order, as `leaves`
      bar.update(group_bytes)
      group, group_bytes = {}, 0
  return jax.tree_util.tree_unflatten(treedef, restored)


def _nest(tree: dict, key_path, leaf) -> None:
  for key in key_path[:-1]:
    tree = tree.setdefault(key.key, {})
  tree[key_path[-1].key] = leaf


def model_type(model_dir: str) -> str:
  """What `vllm-jax convert` (or training) wrote in `model_dir`: 'llama', 'video_llama', ..."""
  return _read_meta(model_dir).get("model_type")


def _read_meta(model_dir: str) -> dict:
  config_path = paths.join(model_dir, "config.json")
  if not paths.is_dir(model_dir):
    raise FileNotFoundError(f"model folder not found: {model_dir}")
  if not paths.is_file(config_path):
    raise FileNotFoundError(f"{model_dir} is not a vllm_jax model folder (no config.json); "
                            "create one with `vllm-jax convert`")
  meta = paths.read_json(config_path)
  if meta.get("model_type") not in meta or not paths.is_dir(paths.join(model_dir, "params")):
    raise ValueError(f"{model_dir} is not a vllm_jax model folder (a Hugging Face one?); convert it first, e.g. "
                     f"`vllm-jax convert llama --hf-dir {model_dir} --out DIR`")
  return meta
