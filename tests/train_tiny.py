"""Tiny LLaMA training set-up shared by the training tests, and a script entry for subprocess tests.

`python tests/train_tiny.py --steps 6 --workdir DIR [--mesh 2,2,2] [--config.x=y ...]` trains the
stand-in (final norm + lm_head train, the rest frozen) on synthetic token data read through grain,
and prints one JSON line per step: {"step", "loss", "grad_norm"} (process 0 only).
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import train_llama_tiny  # noqa: E402
from vllm_jax.data import datasets  # noqa: E402
from vllm_jax.models.llama import Llama, LlamaConfig  # noqa: E402
from vllm_jax.train import checkpoint, sharding, trainer  # noqa: E402


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


def slowly(it, seconds: float):
  for batch in it:
    time.sleep(seconds)
    yield batch


def run(cfg, mesh_shape=(-1, 1, 1), *, devices=None, t=None, sleep_per_step: float = 0.0):
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
    batches = slowly(it, sleep_per_step) if sleep_per_step else it
    result = trainer.train_loop(t, state, batches, steps=cfg.train.steps, checkpointer=ckpt, data_iterator=it,
                                preemption=preemption)
  finally:
    preemption.close()
    if ckpt is not None:
      ckpt.close()
  return t, result


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--mesh", default="-1,1,1")
  parser.add_argument("--sleep_per_step", type=float, default=0.0)
  args, rest = parser.parse_known_args(argv)
  overrides = {}
  for arg in rest:
    key, value = arg.removeprefix("--config.").split("=", 1)
    overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
  sharding.initialize_distributed(heartbeat_timeout_seconds=10)
  import logging  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  cfg = config(**overrides)
  _, result = run(cfg, tuple(int(s) for s in args.mesh.split(",")), sleep_per_step=args.sleep_per_step)
  if jax.process_index() == 0:
    start = cfg.train.steps - len(result.history)
    for i, m in enumerate(result.history):
      print(json.dumps(dict(step=start + i + 1, loss=m["loss"], grad_norm=m["grad_norm"])), flush=True)
    print(json.dumps(dict(done=True, preempted=result.preempted, step=int(result.state.step))), flush=True)


if __name__ == "__main__":
  main()
