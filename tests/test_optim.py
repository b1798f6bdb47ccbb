"""Trainable/frozen split, weight-decay mask, schedule, and AdamW + clipping against torch.optim.AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import train_llama_tiny
from vllm_jax.train import optim

PARAMS = {
    "layers": {"attn": {"q": {"kernel": np.ones((2, 4, 2, 3))}, "o": {"bias": np.ones((2, 4))}},
               "input_norm": {"scale": np.ones((2, 4))}},
    "qformer": {"query_tokens": np.ones((1, 8, 4)), "ln_vision": {"bias": np.ones(4)}},
    "proj": {"kernel": np.ones((4, 6)), "bias": np.ones(6)},
    "norm": {"scale": np.ones(4)},
}


def test_partition_and_merge():
  train, frozen = optim.partition(PARAMS, ["^qformer/", "^proj/"])
  assert sorted(optim.flatten(train)) == ["proj/bias", "proj/kernel", "qformer/ln_vision/bias",
                                          "qformer/query_tokens"]
  assert sorted(optim.flatten(frozen)) == ["layers/attn/o/bias", "layers/attn/q/kernel",
                                           "layers/input_norm/scale", "norm/scale"]
  merged = optim.merge(train, frozen)
  assert optim.flatten(merged).keys() == optim.flatten(PARAMS).keys()
  everything, none = optim.partition(PARAMS, [".*"])
  assert none == {} and optim.flatten(everything).keys() == optim.flatten(PARAMS).keys()


def test_decay_mask_excludes_biases_norms_and_vectors():
  mask = optim.flatten(optim.decay_mask(PARAMS))
  assert {k for k, v in mask.items() if v} == {"layers/attn/q/kernel", "qformer/query_tokens", "proj/kernel"}


def test_warmup_cosine_schedule():
  s = optim.warmup_cosine(lr=1e-4, min_lr=8e-5, warmup_start_lr=1e-6, warmup_steps=10, total_steps=110)
  np.testing.assert_allclose(float(s(0)), 1e-6, rtol=1e-6)
  np.testing.assert_allclose(float(s(5)), 1e-6 + (1e-4 - 1e-6) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(s(60)), 9e-5, rtol=1e-6)  # cosine midpoint
  np.testing.assert_allclose(float(s(110)), 8e-5, rtol=1e-6)
  np.testing.assert_allclose(float(s(500)), 8e-5, rtol=1e-6)  # floor


@pytest.mark.parametrize("clip_norm", [0.0, 0.05])
def test_adamw_matches_torch(clip_norm):
  cfg = train_llama_tiny.optim_config(lr=1e-2, min_lr=1e-3, warmup_start_lr=1e-3, warmup_steps=2,
                                      total_steps=6, clip_norm=clip_norm)
  rng = np.random.RandomState(0)
  params = {"w": {"kernel": rng.randn(4, 3).astype(np.float32), "bias": rng.randn(3).astype(np.float32)},
            "norm": {"scale": rng.randn(2, 3).astype(np.float32)}}
  grads = [{"w": {"kernel": rng.randn(4, 3), "bias": rng.randn(3)}, "norm": {"scale": rng.randn(2, 3)}}
           for _ in range(6)]
  tx, schedule = optim.make_optimizer(cfg, params, len(grads))

  @jax.jit
  def update(params, state, grads, step):
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda p, u: p - schedule(step) * u, params, updates), state

  ours, state = params, tx.init(params)
  for step, g in enumerate(grads):
    ours, state = update(ours, state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), step)

  flat = optim.flatten(params)
  tp = {k: torch.tensor(v, requires_grad=True) for k, v in flat.items()}
  decay = [tp["w/kernel"]]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": [tp["w/bias"], tp["norm/scale"]], "weight_decay": 0.0}],
                          lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
  for step, g in enumerate(grads):
    for k, v in optim.flatten(g).items():
      tp[k].grad = torch.tensor(v, dtype=torch.float32)
    if clip_norm:
      torch.nn.utils.clip_grad_norm_(list(tp.values()), clip_norm)
    for group in opt.param_groups:
      group["lr"] = float(schedule(step))
    opt.step()
  for k, v in optim.flatten(ours).items():
    np.testing.assert_allclose(np.asarray(v), tp[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
  assert not math.isclose(float(optim.flatten(ours)["w/kernel"][0, 0]), float(flat["w/kernel"][0, 0]))
