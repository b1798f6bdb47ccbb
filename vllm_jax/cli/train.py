"""`vllm-jax train`: any system's training recipe from a config file."""

import sys

from vllm_jax.cli import flags

HELP = """Train a model with a config file: `--config FILE:ARG` calls FILE's get_config(ARG)
(e.g. configs/video_llama.py:stage1, :stage2, :stage2_full, :tiny_stage1,
configs/video_llava.py:stage1, :stage2, or configs/llama_vid.py:stage1, :stage2, :stage3; each
system also has :stage2_lora), and each `--config.a.b=VALUE` then sets field a.b, VALUE read as
the field's type (ints, floats, true/false, comma-separated or Python-literal tuples, strings as
they are); --print-config shows the result, each value with where it came from. The config's
`system` names the model family.

Starts from a model folder (--config.init_from=DIR, written by `vllm-jax convert`) or from a
random init of the config's model (with --config.data.tokenizer=DIR). Data: the config's `data`
section (captions, instruction JSON); unreadable media are skipped and counted. Logs a line every
train.log_every steps; with train.workdir (a local folder or gs://bucket/run), writes orbax
checkpoints (workdir/checkpoints), TensorBoard events and metrics/ there, and a rerun resumes from
the latest checkpoint (data position included). SIGTERM checkpoints and stops. Paths may be
relative, ~/..., or gs:// URLs.
Mesh: mesh.data, mesh.fsdp, mesh.tensor (-1 = the remaining devices). The learning-rate schedule
spans train.steps unless optim.total_steps is set; its warm-up is optim.warmup_steps, or
optim.warmup_ratio of the total (the schedule is logged at start).
"""


def add_parser(commands) -> None:
  train = commands.add_parser("train", help="train a model (sharded, checkpointed, resumable)",
                              description=HELP, formatter_class=flags.argparse.RawDescriptionHelpFormatter,
                              usage="vllm-jax train --config FILE[:ARG] [--config.a.b=VALUE ...]")
  flags.recipe_flag(train)
  train.add_argument("--print-config", action="store_true",
                     help="print the effective config, each value with where it came from, and exit")
  train.set_defaults(run=run, takes_overrides=True)


def run(args, overrides: list[str]) -> int:
  import logging

  from vllm_jax import systems
  from vllm_jax.train import sharding
  from vllm_jax.train import run as run_lib
  cfg = flags.load_config(args.config, overrides)
  system = systems.get(cfg.get("system", ""))
  if args.print_config:
    print(describe_config(cfg, args.config, overrides))
    return 0
  if cfg.train.workdir:
    flags.check_resumable_folder("--config.train.workdir", cfg.train.workdir, run_lib.RUN_FILE, {})
  sharding.initialize_distributed()
  import jax
  # One log for the job: process 0 logs, the others only warnings and errors. The progress bar only
  # on a terminal (a batch job's log file would get every redraw).
  first = jax.process_index() == 0
  logging.basicConfig(level=logging.INFO if first else logging.WARNING, format="%(message)s", force=True)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'"
  result = run_lib.train(cfg, system, progress=first and sys.stderr.isatty())
  if first:
    state = "preempted at" if result.preempted else "done at"
    print(f"{state} step {int(result.state.step)}; {result.skipped_examples} unreadable examples skipped",
          file=sys.stderr)
  return 0


def describe_config(cfg, spec: str, overrides: list[str]) -> str:
  """One `key = value  # source` line per field: the recipe (`spec`) or the override that set it."""
  from flax import traverse_util
  changed = {o.removeprefix("--config.").partition("=")[0] for o in overrides}
  flat = traverse_util.flatten_dict(cfg.to_dict(), sep=".")
  width = max(len(k) for k in flat)
  lines = [f"{key.ljust(width)} = {value!r}  # {'--config.' + key if key in changed else spec}"
           for key, value in flat.items()]
  if cfg.get("init_from"):
    lines.append(f"# model.* is replaced by {cfg.init_from}/config.json when the run starts")
  return "\n".join(lines)
