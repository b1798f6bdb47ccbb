"""HF LLaMA / Vicuna / Llama-2/3 folders <-> (LlamaConfig, Flax params)."""

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllm_jax import paths, pretrained
from vllm_jax.converters.core import (IDENTITY, Rule, bias_as, convert, convert_lazily, dense, export,
                                      open_checkpoint, save_lazily, write_safetensors_shards)
from vllm_jax.models.llama import Llama, LlamaConfig
from vllm_jax.nn.rope import RopeConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
IGNORED = (r".*rotary_emb\.inv_freq",)


def rules(config: LlamaConfig) -> list[Rule]:
  layer = "model.layers.{i}."
  table = [
      Rule("model.embed_tokens.weight", "embed_tokens/embedding"),
      Rule(layer + "input_layernorm.weight", "layers/input_norm/scale"),
      Rule(layer + "post_attention_layernorm.weight", "layers/post_attention_norm/scale"),
      Rule(layer + "self_attn.q_proj.weight", "layers/attn/q/kernel", dense()),
      Rule(layer + "self_attn.k_proj.weight", "layers/attn/k/kernel", dense()),
      Rule(layer + "self_attn.v_proj.weight", "layers/attn/v/kernel", dense()),
      Rule(layer + "self_attn.o_proj.weight", "layers/attn/o/kernel", dense(in_dims=2)),
      Rule(layer + "mlp.gate_proj.weight", "layers/mlp/gate/kernel", dense()),
      Rule(layer + "mlp.up_proj.weight", "layers/mlp/up/kernel", dense()),
      Rule(layer + "mlp.down_proj.weight", "layers/mlp/down/kernel", dense()),
      Rule("model.norm.weight", "norm/scale"),
  ]
  if config.attention_bias:
    table += [Rule(layer + f"self_attn.{n}_proj.bias", f"layers/attn/{n}/bias", bias_as())
              for n in ("q", "k", "v", "o")]
  if config.mlp_bias:
    table += [Rule(layer + f"mlp.{n}_proj.bias", f"layers/mlp/{n}/bias", IDENTITY)
              for n in ("gate", "up", "down")]
  if not config.tie_word_embeddings:
    table.append(Rule("lm_head.weight", "lm_head/kernel", dense()))
  return table


def config_from_hf(hf: Mapping[str, Any], **overrides) -> LlamaConfig:
  """LlamaConfig from an HF `config.json` dict (transformers 4 or 5 rope fields)."""
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (LLaMA uses silu)")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  known = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  heads = hf["num_attention_heads"]
  return LlamaConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope=RopeConfig(theta=theta, type=rope_type, **{k: rope[k] for k in known if k in rope}),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list) else hf.get("eos_token_id"),
      pad_token_id=hf.get("pad_token_id"), **overrides)


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
  rope = {"rope_type": config.rope.type, "rope_theta": config.rope.theta}
  if config.rope.type != "default":
    rope["factor"] = config.rope.factor
  if config.rope.type == "llama3":
    rope.update(low_freq_factor=config.rope.low_freq_factor, high_freq_factor=config.rope.high_freq_factor,
                original_max_position_embeddings=config.rope.original_max_position_embeddings)
  eos = config.eos_token_id
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
      "rope_parameters": rope, "rope_theta": config.rope.theta,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
      "mlp_bias": config.mlp_bias, "bos_token_id": config.bos_token_id,
      "eos_token_id": list(eos) if isinstance(eos, tuple) else eos, "pad_token_id": config.pad_token_id,
      "torch_dtype": config.param_dtype,
  }


def abstract_params(config: LlamaConfig):
  """The model's parameters as ShapeDtypeStructs, boxed with their logical axis names."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  # the key is made inside the trace: a concrete one would start a compilation (~40 MB of memory)
  return jax.eval_shape(lambda ids: Llama(config).init(jax.random.key(0), ids), ids)["params"]


def load_hf(hf_dir: str, *, param_dtype: str | None = None, progress: bool = True,
            **overrides) -> tuple[LlamaConfig, dict]:
  """Read an HF LLaMA folder -> (config, params as numpy arrays), one tensor at a time."""
  config, reader, abstract, ignore = _open_hf(hf_dir, param_dtype, overrides)
  params = convert(reader, rules(config), abstract, ignore=ignore, desc="llama", progress=progress)
  return config, params


def convert_hf(hf_dir: str, out_dir: str, *, param_dtype: str | None = None, progress: bool = True,
               **overrides) -> tuple[LlamaConfig, dict]:
  """Write the model folder of an HF LLaMA folder (what `load_hf` then `pretrained.save_llama` write)
  without holding the model: each tensor is read, converted and written on its own, so memory
  stays near the largest tensor. -> (config, params as `LazyTensor`s, which read the HF folder)."""
  config, reader, abstract, ignore = _open_hf(hf_dir, param_dtype, overrides)
  params = convert_lazily(reader, rules(config), abstract, ignore=ignore)
  write = functools.partial(save_lazily, progress=progress, desc="llama")
  pretrained.save_llama(out_dir, config, params, write_params=write)
  return config, params


def _open_hf(hf_dir: str, param_dtype: str | None, overrides: Mapping):
  hf = paths.read_json(paths.join(hf_dir, "config.json"))
  if "num_attention_heads" not in hf:  # e.g. a Video-LLaVA folder, whose LLaMA is a part of it
    raise ValueError(f"{hf_dir} holds a {hf.get('model_type', 'non-LLaMA')!r} model, not a LLaMA: convert it with "
                     "its own source (see `vllm-jax convert --help`)")
  config = config_from_hf(hf, **overrides)
  if param_dtype is not None:
    config = config.replace(param_dtype=param_dtype)
  abstract = nn.meta.unbox(abstract_params(config))
  ignore = IGNORED + ((r"lm_head\.weight",) if config.tie_word_embeddings else ())
  return config, open_checkpoint(hf_dir), abstract, ignore


def save_hf(config: LlamaConfig, params: Mapping, out_dir: str, *, dtype=None,
            tokenizer_dir: str | None = None, max_shard_bytes: int = 4 << 30) -> None:
  """Write an HF folder (`config.json`, safetensors shards, tokenizer files) that
  `LlamaForCausalLM.from_pretrained` loads."""
  with paths.local_output(out_dir) as local:  # shards are renamed into place once all are written
    paths.write_json(paths.join(local, "config.json"), config_to_hf(config))
    write_safetensors_shards(export(params, rules(config), dtype=dtype), local, max_shard_bytes)
  if tokenizer_dir is not None:
    copy_tokenizer(tokenizer_dir, out_dir)


def copy_tokenizer(src_dir: str, out_dir: str) -> list[str]:
  copied = [n for n in TOKENIZER_FILES if paths.exists(paths.join(src_dir, n))]
  for name in copied:
    paths.copy_tree(paths.join(src_dir, name), paths.join(out_dir, name))
  return copied
