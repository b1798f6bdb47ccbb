"""The training run behind `vllm-jax train`, for any system: the model from a converted folder
(`init_from`) or a random init, the system's examples, the sharded train loop, checkpoints and
metrics. The system (`vllm_jax.systems`) supplies the model, its loss and its examples."""

import logging
import os
from typing import Any

import jax.numpy as jnp

from vllm_jax.data.tokenizer import load_tokenizer
from vllm_jax.data import datasets
from vllm_jax.train import checkpoint, sharding, trainer

log = logging.getLogger(__name__)


def make_trainer(cfg, mesh, system, config, params=None) -> trainer.Trainer:
  """A Trainer for `system`'s model of `config`, starting from `params` (sharded like the
  model's parameters) or, without them, from a random init."""
  model = system.model(config)
  if params is None:
    inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in system.init_inputs(config).items()}
    params_fn = lambda rng: model.init(rng, **inputs)["params"]
  else:
    params_fn = lambda rng: params
  return trainer.Trainer(cfg, mesh, system.loss_fn(config), params_fn,
                         sharding.param_shardings(system.abstract_params(config), mesh))


def load_model(cfg, mesh, system) -> tuple[Any, Any, str]:
  """-> (model config, params or None, tokenizer folder). `init_from`: a model folder of the
  system; else `model` with a random init and `data.tokenizer`, whose placeholder ids become
  the model's."""
  if cfg.init_from:
    loaded = system.load(cfg.init_from, mesh=mesh)
    return loaded.config, loaded.params, os.path.join(cfg.init_from, "tokenizer")
  if not cfg.data.tokenizer:
    raise ValueError("set init_from (a converted model folder) or data.tokenizer (for a random init)")
  return system.prepare_init(cfg, load_tokenizer(cfg.data.tokenizer)), None, cfg.data.tokenizer


def train(cfg, system, progress: bool = False) -> trainer.LoopResult:
  """Train to `train.steps`, resuming from the latest checkpoint in `train.workdir`; per-step
  metrics go to `train.workdir`/metrics.jsonl as the run goes (`trainer.MetricsFile`). `progress`:
  a progress bar of the steps."""
  mesh = sharding.mesh_from_config(cfg.mesh)
  config, params, tokenizer_dir = load_model(cfg, mesh, system)
  t = make_trainer(cfg, mesh, system, config, params)
  state = t.init()
  it = iter(datasets.batches(system.dataset(cfg, config, tokenizer_dir), cfg.train.batch_size,
                             worker_count=cfg.data.worker_count))
  ckpt = None
  if cfg.train.workdir:
    ckpt = checkpoint.TrainCheckpointer(os.path.join(cfg.train.workdir, "checkpoints"),
                                        max_to_keep=cfg.train.keep_checkpoints,
                                        async_save=cfg.train.async_checkpoints, save_frozen=cfg.train.save_frozen)
    if ckpt.latest_step() is not None:
      state = ckpt.restore(state, it)
      log.info("resumed from step %d", int(state.step))
  batches = it
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    batches = iter(tqdm(it, desc="training", unit="step", total=cfg.train.steps, initial=int(state.step)))
  preemption = checkpoint.Preemption()
  try:
    return trainer.train_loop(t, state, batches, steps=cfg.train.steps, checkpointer=ckpt, data_iterator=it,
                              preemption=preemption)
  finally:
    preemption.close()
    if ckpt is not None:
      ckpt.close()
