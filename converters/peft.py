"""PEFT LoRA adapters of a LLaMA (`PeftModel.save_pretrained` folders) <-> LoRA params of `models.llama`.

Layout: a folder with `adapter_config.json` (peft_type "LORA", r, lora_alpha, lora_dropout,
target_modules as HF module names, bias "none", ...) and `adapter_model.safetensors` (or the older
`adapter_model.bin`). Its keys (prefix `base_model.model.model.layers.{i}.`), in torch layout
lora_A [r, in_features], lora_B [out_features, r], stacked over the L layers:
  self_attn.{q,k,v}_proj.lora_A [r, E]      -> layers/attn/{q,k,v}/lora_a [L, E, r]
  self_attn.{q,k,v}_proj.lora_B [H*D, r]    -> layers/attn/{q,k,v}/lora_b [L, r, H, D]
  self_attn.o_proj.lora_A [r, H*D]          -> layers/attn/o/lora_a [L, H, D, r]
  self_attn.o_proj.lora_B [E, r]            -> layers/attn/o/lora_b [L, r, E]
  mlp.{gate,up}_proj.lora_A [r, E]          -> layers/mlp/{gate,up}/lora_a [L, E, r]
  mlp.{gate,up}_proj.lora_B [M, r]          -> layers/mlp/{gate,up}/lora_b [L, r, M]
  mlp.down_proj.lora_A [r, M]               -> layers/mlp/down/lora_a [L, M, r]
  mlp.down_proj.lora_B [E, r]               -> layers/mlp/down/lora_b [L, r, E]
Each key ends in `.weight`; k and v have K heads instead of H. Heads are split off the torch out/in axis as the base
kernels' are (`converters.llama`). Only the scaling alpha / r of plain LoRA is supported: rsLoRA,
DoRA, biases, per-module rank/alpha patterns, layer subsets and modules beyond the seven
projections are refused.
"""

from typing import Any, Mapping

import flax.linen as nn
from flax import traverse_util

from vllm_jax import paths
from vllm_jax.converters.core import Rule, convert, dense, export, open_checkpoint, write_safetensors
from vllm_jax.converters.llama import abstract_params
from vllm_jax.models.llama import LlamaConfig
from vllm_jax.nn.lora import TARGETS, LoraConfig

PREFIX = "base_model.model.model.layers.{i}."
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
PATHS = {"q": "layers/attn/q", "k": "layers/attn/k", "v": "layers/attn/v", "o": "layers/attn/o",
         "gate": "layers/mlp/gate", "up": "layers/mlp/up", "down": "layers/mlp/down"}
HF_NAMES = {t: MODULES[t].split(".")[-1] for t in TARGETS}  # q -> q_proj
# adapter_config.json fields that change what the adapter computes or holds: these must be falsy.
UNSUPPORTED = ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
               "layers_to_transform", "modules_to_save", "exclude_modules", "target_parameters",
               "layer_replication", "trainable_token_indices")


def rules(config: LlamaConfig) -> list[Rule]:
  """Rules for the adapters of `config.lora.targets`: A as its kernel's input axes, B as rank -> out."""
  if config.lora is None:
    raise ValueError("the LlamaConfig has no LoRA (config.lora is None)")
  return [rule for t in config.lora.targets for rule in (
      Rule(PREFIX + MODULES[t] + ".lora_A.weight", PATHS[t] + "/lora_a", dense(in_dims=2 if t == "o" else 1)),
      Rule(PREFIX + MODULES[t] + ".lora_B.weight", PATHS[t] + "/lora_b", dense()))]


def abstract_adapter(config: LlamaConfig) -> dict:
  """The lora_a/lora_b leaves of `Llama(config)`'s params, as ShapeDtypeStructs."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(config)), sep="/")
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k.endswith(("/lora_a", "/lora_b"))},
                                      sep="/")


def adapter_config(lora: LoraConfig, base_model: str = "") -> dict[str, Any]:
  """The `adapter_config.json` dict of a plain LoRA with `lora`'s rank, alpha, dropout, targets."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
          "lora_dropout": lora.dropout, "target_modules": [HF_NAMES[t] for t in TARGETS if t in lora.targets],
          "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
          "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
          "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_model or None,
          "inference_mode": True}


def lora_from_adapter_config(hf: Mapping[str, Any]) -> LoraConfig:
  """LoraConfig from an `adapter_config.json` dict; ValueError naming what is not plain LoRA."""
  problems = [f"{key}={hf[key]!r}" for key in UNSUPPORTED if hf.get(key)]
  if hf.get("peft_type") != "LORA":
    problems.append(f"peft_type={hf.get('peft_type')!r} (expected 'LORA')")
  if hf.get("bias", "none") != "none":
    problems.append(f"bias={hf['bias']!r} (expected 'none')")
  modules = hf.get("target_modules") or []
  if isinstance(modules, str):
    problems.append(f"target_modules={modules!r} (a regex; expected a list of module names)")
    modules = []
  unknown = sorted(set(modules) - set(HF_NAMES.values()))
  if unknown:
    problems.append(f"target_modules {unknown} (expected some of {', '.join(HF_NAMES.values())})")
  if not modules:
    problems.append("no target_modules")
  if problems:
    raise ValueError("unsupported LoRA adapter config: " + "; ".join(problems))
  return LoraConfig(rank=hf["r"], alpha=float(hf["lora_alpha"]), dropout=float(hf.get("lora_dropout", 0.0)),
                    targets=tuple(t for t in TARGETS if HF_NAMES[t] in modules))


def save_adapter(config: LlamaConfig, params: Mapping, out_dir: str, base_model: str = "") -> None:
  """Write the adapters of `params` (the LLM's params tree, or just its lora leaves) as a PEFT
  folder that `PeftModel.from_pretrained(LlamaForCausalLM, out_dir)` loads."""
  paths.write_json(paths.join(out_dir, "adapter_config.json"), adapter_config(config.lora, base_model))
  with paths.local_output(paths.join(out_dir, "adapter_model.safetensors")) as local:
    write_safetensors(list(export(params, rules(config))), local)


def load_adapter(adapter_dir: str, config: LlamaConfig) -> tuple[LlamaConfig, dict]:
  """Read a PEFT LoRA folder for the LLaMA of `config` -> (config with `.lora` from the folder,
  a params tree holding only lora_a/lora_b leaves as numpy arrays in `config.param_dtype`).
  Raises `CheckpointMismatchError` naming missing, unexpected and mis-shaped keys."""
  path = paths.join(adapter_dir, "adapter_config.json")
  if not paths.exists(path):
    raise FileNotFoundError(f"no adapter_config.json in {adapter_dir}")
  config = config.replace(lora=lora_from_adapter_config(paths.read_json(path)))
  weights = paths.join(adapter_dir, "adapter_model.safetensors")
  if not paths.exists(weights):
    weights = paths.join(adapter_dir, "adapter_model.bin")
  params = convert(open_checkpoint(weights), rules(config), abstract_adapter(config), desc="lora", progress=False)
  return config, params
