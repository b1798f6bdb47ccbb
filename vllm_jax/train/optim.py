"""Trainable/frozen split, AdamW with weight-decay exclusions, and the warmup + cosine schedule.

Parameter paths are '/'-joined, e.g. `layers/attn/q/kernel`. A parameter trains when any of the
`trainable` regexes matches its path (`re.search`); everything else is frozen: kept in
`frozen_dtype`, never differentiated, and given no optimizer state. Trainable parameters stay in
their (fp32) master dtype; the model computes in its own `dtype`.
"""

import logging
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

log = logging.getLogger(__name__)

Params = dict[str, Any]

# The reference's AdamW groups: no decay on biases, norm parameters and 1-D tensors.
NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$", r"norm", r"(^|/)ln_")


def flatten(params: Params) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: dict[str, Any]) -> Params:
  return traverse_util.unflatten_dict(flat, sep="/")


def matches(path: str, regexes: Sequence[str]) -> bool:
  return any(re.search(r, path) for r in regexes)


def partition(params: Params, trainable: Sequence[str]) -> tuple[Params, Params]:
  """Split a nested params dict into (trainable, frozen) nested dicts with disjoint leaves."""
  flat = flatten(params)
  train = {k: v for k, v in flat.items() if matches(k, trainable)}
  frozen = {k: v for k, v in flat.items() if k not in train}
  return unflatten(train), unflatten(frozen)


def merge(trainable: Params, frozen: Params) -> Params:
  """Inverse of `partition`."""
  return unflatten({**flatten(frozen), **flatten(trainable)})


def cast(params: Params, dtype: Any) -> Params:
  return jax.tree.map(lambda x: x.astype(dtype), params)


def decay_mask(params: Params, no_decay: Sequence[str] = NO_DECAY) -> Params:
  """True where weight decay applies: tensors of rank >= 2 whose path matches no `no_decay` regex."""
  return unflatten({k: bool(v.ndim >= 2 and not matches(k, no_decay)) for k, v in flatten(params).items()})


def warmup_cosine(lr: float, min_lr: float, warmup_start_lr: float, warmup_steps: int,
                  total_steps: int) -> optax.Schedule:
  """Linear warmup from `warmup_start_lr` to `lr` over `warmup_steps`, then cosine from `lr` down to
  `min_lr` at `total_steps` (held there afterwards)."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_start_lr + (lr - warmup_start_lr) * step / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    cosine = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine)
  return schedule


def schedule_steps(cfg, steps: int) -> tuple[int, int]:
  """(warm-up steps, total steps) of an `optim` section for a run of `steps` steps: total_steps 0
  means the run's length, and warmup_ratio > 0 gives the warm-up as that fraction of the total
  (rounded up, as the transformers Trainer does) in place of warmup_steps."""
  if cfg.warmup_steps and cfg.warmup_ratio:
    raise ValueError(f"set optim.warmup_steps ({cfg.warmup_steps}) or optim.warmup_ratio ({cfg.warmup_ratio}), "
                     "not both")
  total = cfg.total_steps or steps
  return (math.ceil(cfg.warmup_ratio * total) if cfg.warmup_ratio else cfg.warmup_steps), total


def make_schedule(cfg, steps: int) -> optax.Schedule:
  """From an `optim` config section (lr, min_lr, warmup_start_lr, warmup_steps or warmup_ratio,
  total_steps) for a run of `steps` steps; logs the schedule it resolved to."""
  warmup, total = schedule_steps(cfg, steps)
  log.info("schedule: warm-up %d steps from %g to %g, cosine to %g at step %d", warmup, cfg.warmup_start_lr,
           cfg.lr, cfg.min_lr, total)
  if warmup >= total:
    log.warning("the warm-up (%d steps) does not end before step %d: lr never reaches %g", warmup, total, cfg.lr)
  return warmup_cosine(cfg.lr, cfg.min_lr, cfg.warmup_start_lr, warmup, total)


def make_optimizer(cfg, trainable_params: Params,
                   steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW direction without the learning rate: clip -> Adam -> decoupled weight decay.

  The train step scales the result by `-schedule(step)`, so the rate follows the step counter
  (skipped non-finite steps included) while Adam's bias correction counts only applied updates.
  `trainable_params` (arrays or ShapeDtypeStructs) fixes the decay mask; `steps`, the run's length,
  the schedule's unless `cfg.total_steps` sets it.
  """
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  if cfg.weight_decay:
    parts.append(optax.add_decayed_weights(cfg.weight_decay, decay_mask(trainable_params, cfg.no_decay)))
  return optax.chain(*parts), make_schedule(cfg, steps)
