"""Tiny LLaMA training set-up shared by the in-process training tests: the final norm and lm_head
train, the rest frozen, on synthetic token data read through grain. (Subprocess tests run
`vllm-jax train` itself: see test_multiprocess.tiny_run.)"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax.configs import train_llama_tiny
from vllm_jax.data import datasets
from vllm_jax.models.llama import Llama, LlamaConfig
from vllm_jax.train import checkpoint, sharding, trainer


class SyntheticTokens:
  """Record {"seed": i} -> input_ids, attention_mask, labels [T] (the first 4 positions unlabelled)."""

  def __init__(self, seq_len: int, vocab: int):
    self.seq_len, self.vocab = seq_len, vocab

  def __call__(self, record):
    ids = np.random.RandomState(record["seed"]).randint(3, self.vocab, self.seq_len).astype(np.int32)
    labels = ids.copy()
    labels[:4] = trainer.IGNORE_INDEX
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), labels=labels)


def config(**overrides):
  cfg = train_llama_tiny.get_config()
  cfg.update_from_flattened_dict(overrides)
  return cfg


def make_trainer(cfg, mesh) -> trainer.Trainer:
  model = Llama(LlamaConfig(**cfg.model))
  ids = jnp.zeros((1, 1), jnp.int32)
  params_fn = lambda rng: model.init(rng, ids)["params"]
  boxed = jax.eval_shape(params_fn, jax.random.key(0))
  return trainer.Trainer(cfg, mesh, trainer.causal_lm_loss(model), params_fn,
                         sharding.param_shardings(boxed, mesh))


def data_iterator(cfg, num_records: int = 256):
  records = [{"seed": i} for i in range(num_records)]
  ds = datasets.examples(records, SyntheticTokens(cfg.data.seq_len, cfg.model.vocab_size), seed=cfg.seed,
                         shuffle=cfg.data.shuffle)
  return iter(datasets.batches(ds, cfg.train.batch_size, worker_count=cfg.data.worker_count))


def run(cfg, mesh_shape=(-1, 1, 1), *, devices=None, t=None):
  """Train to cfg.train.steps, resuming from cfg.train.workdir when it has a checkpoint.
  -> (trainer, LoopResult); pass the trainer back in `t` to reuse its compiled step."""
  t = t or make_trainer(cfg, sharding.make_mesh(mesh_shape, devices))
  # Non-partitionable threefry compiles much faster on CPU; the initial values do not matter here.
  with jax.threefry_partitionable(False):
    state = t.init()
  it = data_iterator(cfg)
  ckpt = None
  if cfg.train.workdir:
    ckpt = checkpoint.TrainCheckpointer(os.path.join(cfg.train.workdir, "checkpoints"),
                                        max_to_keep=cfg.train.keep_checkpoints,
                                        async_save=cfg.train.async_checkpoints,
                                        save_frozen=cfg.train.save_frozen)
    if ckpt.latest_step() is not None:
      state = ckpt.restore(state, it)
  preemption = checkpoint.Preemption()
  try:
    result = trainer.train_loop(t, state, it, steps=cfg.train.steps, checkpointer=ckpt, data_iterator=it,
                                preemption=preemption)
  finally:
    preemption.close()
    if ckpt is not None:
      ckpt.close()
  return t, result
