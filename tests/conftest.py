"""Test set-up: 8 fake CPU devices for every test (set before jax is imported), fp32 matmuls,
and cheap compiles (tiny models: XLA's compile time dominates, its optimisations buy nothing)."""

import os

FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
         "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAGS).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def trained_scale_init_(model):
  """Draw every parameter of a torch `model` at the scale of a trained network: matrices (and convs)
  N(0, 1/fan_in), so activations neither vanish nor blow up; norm scales N(1, 0.1); biases N(0, 0.02);
  embedding tables and learned tokens N(0, 1). With big biases and norm scales near zero (a plain
  N(0, 0.2) init) the output is mostly the last bias, and dropping a frame mask, reordering frames or
  losing a position embedding moves it by less than a parity tolerance."""
  import torch
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if p.ndim == 1 and leaf == "weight":
        torch.nn.init.normal_(p, mean=1.0, std=0.1)
      elif p.ndim == 1 or "bias" in leaf:
        torch.nn.init.normal_(p, std=0.02)
      elif p.ndim == 4 or p.ndim == 2 and leaf.endswith("weight") and "embed" not in name.rsplit(".", 2)[-2]:
        torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)
      else:
        torch.nn.init.normal_(p, std=1.0)
  return model
