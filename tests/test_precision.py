"""`compute_dtype`: the full-size recipes compute in bfloat16 (every matmul of the train step),
with fp32 master weights for the trained parameters; the loss stays close to float32's."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllm_jax import systems
from vllm_jax.train import flops, optim, plan

RECIPES = [("video_llama", "tiny_stage1"), ("video_llava", "tiny_stage2"), ("llama_vid", "tiny_stage2")]


def step_inputs(cfg, system, config, rng):
  """Random parameters (frozen ones in `optim.frozen_dtype`, as the trainer keeps them) and a batch."""
  model = system.model(config)
  inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in system.init_inputs(config).items()}
  params = nn.meta.unbox(model.init(rng, **inputs)["params"])
  trainable, frozen = optim.partition(params, cfg.optim.trainable)
  params = optim.merge(trainable, optim.cast(frozen, cfg.optim.frozen_dtype))
  batch = {}
  for k, v in system.batch_spec(cfg, config).items():
    if v.dtype == np.int32:  # token ids of the text vocabulary, all learned, no padding
      batch[k] = np.full(v.shape, 1 if k == "attention_mask" else 7, np.int32)
    else:
      batch[k] = np.asarray(jax.random.normal(jax.random.key(1), v.shape), v.dtype) if v.dtype != np.bool_ \
          else np.ones(v.shape, bool)
  return params, batch


@pytest.mark.parametrize("module, recipe", RECIPES)
def test_bfloat16_compute(module, recipe):
  cfg = importlib.import_module(f"vllm_jax.configs.{module}").get_config(recipe)
  assert cfg.compute_dtype == "float32"  # tiny recipes: as the parity tests
  cfg.train.batch_size = 2
  system = systems.get(cfg.system)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    cfg.compute_dtype = dtype
    config = plan.model_config(cfg, system)
    params, batch = step_inputs(cfg, system, config, jax.random.key(0))
    loss_fn = system.loss_fn(config)
    count = flops.count_jaxpr(jax.make_jaxpr(loss_fn)(params, batch, None))
    assert set(count.by_dtype) == {dtype}, count.by_dtype  # every matmul, frozen or trained
    total, tokens = jax.jit(loss_fn)(params, batch, None)
    assert total.dtype == jnp.float32
    losses[dtype] = float(total / tokens)
    trainable, _ = optim.partition(params, cfg.optim.trainable)
    assert {a.dtype for a in jax.tree.leaves(trainable)} == {jnp.dtype("float32")}  # master weights
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


def test_full_size_recipes_compute_in_bfloat16():
  for module, stage in [("video_llama", "stage1"), ("video_llava", "stage2"), ("llama_vid", "stage2")]:
    cfg = importlib.import_module(f"vllm_jax.configs.{module}").get_config(stage)
    config = plan.model_config(cfg, systems.get(cfg.system))
    assert config.llama.dtype == "bfloat16" and config.llama.param_dtype == "float32", module
    # The recipe's LLM remat policy applies over the model's (an init_from folder's too).
    want = "dots_with_no_batch_dims_saveable" if module == "video_llama" else "nothing_saveable"
    assert config.llama.remat_policy == want, module
