"""`vllm_jax.train.run.train`: the metrics survive a crash and agrees with the checkpoint a rerun
resumes from; the learning-rate schedule follows the run length unless the config fixes it."""

import logging
import os
import types

import jax
import jax.numpy as jnp
import pytest

import train_tiny
from vllm_jax.cli.flags import load_config
from vllm_jax.data import datasets
from vllm_jax.models.llama import Llama, LlamaConfig
from vllm_jax.train import optim, run, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = jnp.zeros((1, 1), jnp.int32)

# The training side of a system (`vllm_jax.systems.base`): train_tiny's LLaMA on synthetic tokens.
TINY_LLAMA = types.SimpleNamespace(
    model=Llama,
    init_inputs=lambda config: {"input_ids": IDS},
    abstract_params=lambda config: jax.eval_shape(lambda k: Llama(config).init(k, IDS)["params"], jax.random.key(0)),
    loss_fn=lambda config: trainer.causal_lm_loss(Llama(config)),
    batch_spec=lambda cfg, config: {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jnp.int32)
                                    for k in ("input_ids", "attention_mask", "labels")},
    dataset=lambda cfg, config, tokenizer_dir: datasets.examples(
        [{"seed": i} for i in range(256)], train_tiny.SyntheticTokens(cfg.data.seq_len, config.vocab_size),
        seed=cfg.seed, shuffle=cfg.data.shuffle))


class Crash(Exception):
  pass


def test_metrics_survive_a_crash_and_follow_the_checkpoint(tmp_path, monkeypatch, caplog):
  """Logged every 3 steps, checkpointed every 4: a run dies after step 5 with 1-4 on disk (3 logged,
  4 checkpointed); a rerun from step 4 dies after 7 with 5-6 logged too; the last rerun, from step 4
  again, leaves each step once, 5-12 its own."""
  monkeypatch.setattr(run, "model_config", lambda cfg, system: (LlamaConfig(**cfg.model), ""))
  cfg = lambda **overrides: train_tiny.config(**{
      "train.steps": 12, "train.workdir": str(tmp_path), "train.log_every": 3, "train.checkpoint_every": 4,
      **overrides})
  train_step = trainer.Trainer.train_step

  def crash_after(n):
    def step(self, state, batch):
      if int(state.step) == n:
        raise Crash
      return train_step(self, state, batch)
    return step

  caplog.set_level(logging.INFO)
  for n, on_disk in ((5, 4), (7, 6)):
    with monkeypatch.context() as m, pytest.raises(Crash):
      m.setattr(trainer.Trainer, "train_step", crash_after(n))
      run.train(cfg(), TINY_LLAMA)
    lost = trainer.read_metrics(tmp_path)
    assert [m["step"] for m in lost] == list(range(1, on_disk + 1))
  assert "schedule: warm-up 5 steps from 0.0001 to 0.01, cosine to 0.001 at step 100" in caplog.messages

  result = run.train(cfg(**{"optim.lr": 2e-2}), TINY_LLAMA)  # another peak lr: other values from step 5
  final = trainer.read_metrics(tmp_path)
  assert [m["step"] for m in final] == list(range(1, 13))
  assert final[:4] == lost[:4]
  assert final[4:] == [dict(step=5 + i, **m) for i, m in enumerate(result.history)]
  assert final[4]["lr"] != lost[4]["lr"]


@pytest.mark.parametrize("recipe, warmup, total", [
    ("video_llama.py:stage1", 2500, 12500), ("video_llama.py:stage2", 1000, 3000),
    ("video_llama.py:stage2_full", 90, 3000), ("video_llama.py:tiny_stage1", 5, 100),
    ("video_llava.py:stage1", 148, 4922), ("video_llava.py:stage2", 180, 5977),
    ("video_llava.py:tiny_stage2", 5, 100), ("llama_vid.py:stage1", 93, 3086),
    ("llama_vid.py:stage2", 179, 5961), ("llama_vid.py:stage3", 34, 1125), ("demo.py", 30, 700)])
def test_recipe_schedules(recipe, warmup, total):
  cfg = load_config(os.path.join(ROOT, "configs", recipe), [])
  assert optim.schedule_steps(cfg.optim, cfg.train.steps) == (warmup, total)


def test_schedule_follows_the_run_length_unless_set():
  llava = os.path.join(ROOT, "configs/video_llava.py:stage1")
  cfg = load_config(llava, ["--config.train.steps=400"])
  assert optim.schedule_steps(cfg.optim, cfg.train.steps) == (12, 400)  # 3% warm-up
  schedule = optim.make_schedule(cfg.optim, cfg.train.steps)
  assert float(schedule(11)) < float(schedule(12)) == pytest.approx(cfg.optim.lr)
  assert float(schedule(400)) == cfg.optim.min_lr == 0.0
  assert float(schedule(200)) > 0.4 * cfg.optim.lr

  cfg = load_config(llava, ["--config.train.steps=400", "--config.optim.total_steps=1000"])
  assert optim.schedule_steps(cfg.optim, cfg.train.steps) == (30, 1000)
  assert float(optim.make_schedule(cfg.optim, cfg.train.steps)(400)) > 0.5 * cfg.optim.lr

  # Video-LLaMA's warm-up is absolute.
  cfg = load_config(os.path.join(ROOT, "configs/video_llama.py:stage2"), ["--config.train.steps=8000"])
  schedule = optim.make_schedule(cfg.optim, cfg.train.steps)
  assert float(schedule(1000)) == pytest.approx(cfg.optim.lr) and float(schedule(4500)) > 1.5 * cfg.optim.min_lr
  assert float(schedule(8000)) == pytest.approx(cfg.optim.min_lr)

  with pytest.raises(ValueError, match="not both"):
    optim.schedule_steps(load_config(llava, ["--config.optim.warmup_steps=10"]).optim, 400)


def test_print_config_names_where_each_value_came_from(capsys):
  from vllm_jax import cli
  recipe = os.path.join(ROOT, "configs/video_llava.py:tiny_stage2")
  assert cli.main(["train", "--config", recipe, "--config.train.steps=7", "--config.init_from=/m",
                   "--print-config"]) == 0
  lines = {line.split("=")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
  assert lines["train.steps"].endswith("= 7  # --config.train.steps")
  assert lines["train.batch_size"].endswith(f"= 8  # {recipe}")
  assert "# model.* is replaced by /m/config.json when the run starts" in lines
