"""LoRA: a low-rank update beside a frozen kernel, y = x W + (alpha / rank) * dropout(x) A B.

A Dense with a `LoraConfig` holds `lora_a` [*in_shape, rank] (PEFT's init: uniform within
1/sqrt(fan_in)) and `lora_b` [rank, *features] (zeros, so training starts from the base model);
their logical axes are the kernel's input and output axes, so they shard like it. LLaMA names
its projections q, k, v, o (attention) and gate, up, down (MLP); `targets` picks among them.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from vllm_jax.nn.config import ConfigBase

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig(ConfigBase):
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.05           # on the adapter's input, in training (a "dropout" rng given)
  targets: tuple[str, ...] = TARGETS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    unknown = sorted(set(self.targets) - set(TARGETS))
    if unknown:
      raise ValueError(f"unknown LoRA targets {unknown}; expected some of {', '.join(TARGETS)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def delta(a: jax.Array, b: jax.Array, kernel_ndim: int, scale: float) -> jax.Array:
  """One adapter's kernel update, scale * A B: A [*lead, *in, r], B [*lead, r, *out] ->
  [*lead, *in, *out], where `lead` are axes both share (scanned layers)."""
  product = lambda x, y: jnp.tensordot(x, y, axes=1)
  for _ in range(a.ndim + b.ndim - 2 - kernel_ndim):
    product = jax.vmap(product)
  return product(a.astype(jnp.float32), b.astype(jnp.float32)) * scale


def merge(params: dict[str, Any], config: LoraConfig) -> dict[str, Any]:
  """The params with every adapter folded into its kernel (W + scale * A B) and removed: the
  weights of the plain model, computing what the adapted one computes."""
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for path, value in flat.items():
    if path.endswith("/lora_a") or path.endswith("/lora_b"):
      continue
    prefix = path[:-len("kernel")]
    if path.endswith("/kernel") and prefix + "lora_a" in flat:
      update = delta(flat[prefix + "lora_a"], flat[prefix + "lora_b"], value.ndim, config.scale)
      value = (value.astype(jnp.float32) + update).astype(value.dtype)
    out[path] = value
  return traverse_util.unflatten_dict(out, sep="/")
