"""What each field of a training config may hold, checked before anything loads: a value out of
range would otherwise surface after minutes of loading and compiling (a zero `log_every` divides by
zero at the first step), or never (`max_text_len` 0 trains on nothing at loss 0.0).

`FIELDS` is the one table: a field's dotted key -> its rule. A recipe without the field skips it.
"""

import dataclasses
import math
from typing import Any

from vllm_jax import paths


@dataclasses.dataclass(frozen=True)
class Number:
  """An int (`kind` int) or a finite number in [low, high] ((low, high] with `low_open`); the
  values of `special` are allowed besides, with their meaning."""
  kind: type = int
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  special: tuple[tuple[Any, str], ...] = ()

  def problem(self, value) -> str | None:
    if not isinstance(value, bool) and any(value == v for v, _ in self.special):
      return None
    number = isinstance(value, int if self.kind is int else (int, float)) and not isinstance(value, bool)
    fits = (number and math.isfinite(value) and (self.high is None or value <= self.high)
            and (self.low is None or (value > self.low if self.low_open else value >= self.low)))
    return None if fits else f"must be {self.describe()}"

  def describe(self) -> str:
    what = "an integer" if self.kind is int else "a finite number"
    if self.low is not None and self.high is not None:
      what += f" in {'(' if self.low_open else '['}{self.low}, {self.high}]"
    elif self.low is not None:
      what += f" {'above' if self.low_open else 'of at least'} {self.low}"
    return what + "".join(f", or {v} ({meaning})" for v, meaning in self.special)


@dataclasses.dataclass(frozen=True)
class OneOf:
  """One of `choices`."""
  choices: tuple[str, ...]

  def problem(self, value) -> str | None:
    return None if value in self.choices else f"must be one of {', '.join(map(repr, self.choices))}"


@dataclasses.dataclass(frozen=True)
class RematPolicy:
  """A `jax.checkpoint_policies` name ("" keeps the model's own, "none" recomputes nothing)."""

  def problem(self, value) -> str | None:
    import jax  # pylint: disable=g-import-not-at-top
    if value in ("", "none") or (isinstance(value, str) and callable(getattr(jax.checkpoint_policies, value, None))):
      return None
    return "must be a jax.checkpoint_policies name (e.g. nothing_saveable, dots_with_no_batch_dims_saveable), or ''"


@dataclasses.dataclass(frozen=True)
class Weights:
  """Mixture weights: non-negative numbers, one of them positive."""

  def problem(self, value) -> str | None:
    if (isinstance(value, (tuple, list)) and value and all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0
                                                           for w in value) and sum(value) > 0):
      return None
    return "must be non-negative numbers, one of them above 0"


COUNT = Number(int, 1)
COUNT_OR_OFF = Number(int, 0)
RATE = Number(float, 0)
FRACTION = Number(float, 0, 1)
DEVICES = Number(int, 1, special=((-1, "the remaining devices"),))
DTYPES = OneOf(("float32", "bfloat16", "float16"))

FIELDS = {
    "seed": Number(int),
    "compute_dtype": OneOf(("", "float32", "bfloat16", "float16")),
    "attention_impl": OneOf(("", "auto", "xla", "cudnn", "splash")),
    "llm_remat_policy": RematPolicy(),
    "context_remat_policy": RematPolicy(),
    "loss_chunk": COUNT_OR_OFF,
    "context_length": COUNT_OR_OFF,
    "rope_context": COUNT_OR_OFF,
    "mesh.data": DEVICES,
    "mesh.fsdp": DEVICES,
    "mesh.tensor": DEVICES,
    "optim.frozen_dtype": DTYPES,
    "optim.lr": RATE,
    "optim.min_lr": RATE,
    "optim.warmup_start_lr": RATE,
    "optim.warmup_steps": COUNT_OR_OFF,
    "optim.warmup_ratio": Number(float, 0, 1),
    "optim.total_steps": COUNT_OR_OFF,
    "optim.b1": FRACTION,
    "optim.b2": FRACTION,
    "optim.eps": Number(float, 0, low_open=True),
    "optim.weight_decay": RATE,
    "optim.clip_norm": RATE,
    "optim.grad_accum": COUNT,
    "train.steps": COUNT,
    "train.batch_size": COUNT,
    "train.log_every": COUNT,
    "train.eval_every": COUNT_OR_OFF,
    "train.eval_steps": COUNT,
    "train.checkpoint_every": COUNT,
    "train.keep_checkpoints": COUNT,
    "train.max_nan_skips": COUNT_OR_OFF,
    "train.peak_tflops": RATE,
    "data.seq_len": COUNT,
    "data.max_text_len": COUNT,
    "data.max_len": COUNT,
    "data.max_frames": COUNT,
    "data.max_turns": COUNT,
    "data.num_epochs": Number(int, 1, special=((-1, "repeat forever"),)),
    "data.worker_count": COUNT_OR_OFF,
    "data.max_skipped": Number(int, 0, special=((-1, "no limit"),)),
    "data.weights": Weights(),
    "data.instruct_format": OneOf(("llava", "videochat")),
    "data.sampling": OneOf(("headtail", "uniform", "linspace")),
    "data.text_format": OneOf(("caption", "conversation")),
    "data.image_aspect_ratio": OneOf(("square", "pad")),
    "demo.num_train": COUNT,
    "demo.num_val": COUNT,
    "demo.eval_batch_size": COUNT,
}


def problems(cfg) -> list[str]:
  """`--config.key=value: what it must be` for every field of `cfg` (a ConfigDict) that breaks its rule."""
  found = []
  for key, rule in FIELDS.items():
    node, *parents = cfg, *key.split(".")[:-1]
    for part in parents:
      node = node.get(part) if hasattr(node, "get") else None
    name = key.rsplit(".", 1)[-1]
    if not hasattr(node, "get") or name not in node:
      continue
    problem = rule.problem(node[name])
    if problem:
      found.append(f"--config.{key}={node[name]!r}: {problem}")
  return found


def check(cfg) -> None:
  """ValueError naming every field of `cfg` out of its range (one line, fields joined by '; ')."""
  found = problems(cfg)
  if found:
    raise ValueError("; ".join(found))


# Fields naming what a run reads -> "file" or "folder" (an annotation file may also be a manifest folder).
PATHS = {
    "init_from": "folder",
    "data.tokenizer": "folder",
    "data.instruction_tokenizer": "folder",
    "data.webvid_csv": "file",
    "data.webvid_dir": "folder",
    "data.instruct_json": "file",
    "data.instruct_dir": "folder",
    "data.feature_cache": "folder",
}


def check_paths(cfg) -> None:
  """FileNotFoundError naming every path field of `cfg` set to something that is not there (local
  or in a bucket): checked before a run loads anything."""
  missing = []
  for key, kind in PATHS.items():
    section, _, name = key.rpartition(".")
    node = cfg.get(section) if section else cfg
    value = node.get(name) if hasattr(node, "get") else None
    if value and not (paths.is_dir(value) if kind == "folder" else paths.exists(value)):
      missing.append(f"--config.{key}={value}: no such {kind}")
  if missing:
    raise FileNotFoundError("; ".join(missing))
