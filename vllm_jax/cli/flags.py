"""What the commands share: flag groups, config files with `--config.a.b=VALUE` overrides, model
loading, error lines and the question loop."""

import argparse
import ast
import difflib
import importlib.util
import os
import sys

import ml_collections

from vllm_jax import paths
from vllm_jax.train import config_check


def checked(check, path: str):
  """`check(path)` (a `paths` function) in an argparse type: a bad path or an unreachable store is
  the flag's error."""
  try:
    return check(path)
  except (ValueError, paths.StorageError) as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def existing_file(path: str) -> str:
  """An argparse type: a file that exists, local or stored (checked before any model loads)."""
  if not checked(paths.is_file, path):
    raise argparse.ArgumentTypeError(f"no such file: {path}")
  return path


def existing_folder(path: str) -> str:
  """An argparse type: a folder that exists, local or stored."""
  if not checked(paths.is_dir, path):
    raise argparse.ArgumentTypeError(f"no such folder: {path}")
  return path


def new_file(path: str) -> str:
  """An argparse type: a file that can be written in an existing folder (any folder on a store,
  whose folders are only names)."""
  try:
    paths.check_writable(path)
  except OSError as e:
    raise argparse.ArgumentTypeError(paths.os_error_message(e)) from None
  folder = checked(paths.parent, path)
  if not paths.is_url(folder) and not paths.is_dir(folder):
    raise argparse.ArgumentTypeError(f"the folder of {path} does not exist")
  if checked(paths.is_dir, path):
    raise argparse.ArgumentTypeError(f"{path} is a folder: give a file")
  return path


def overwrite_flag(parser) -> None:
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an output folder that already holds something (the old folder is "
                           "removed only once the new one is complete); without it, such a folder is refused")


def apart_from_inputs(flag: str, path: str, inputs: dict[str, str | None]) -> None:
  """Refuse an output that is or holds one of `inputs` ({what to call it: its path}; None: not
  given), whatever the flags: ValueError, the command's one error line."""
  for label, given in inputs.items():
    relation = paths.covers(path, given) if given else None
    if relation:
      raise ValueError(f"{flag} {path} {relation} {label} {given}: give another path")


def check_output_folder(flag: str, path: str, overwrite: bool, inputs: dict[str, str | None]) -> None:
  """Before anything loads: refuse (ValueError) an output folder that is or holds an input, and,
  without `overwrite`, one that exists and is not an empty folder; OSError for one that cannot be
  written where it is. Write it in `paths.staged_folder(path, replace=overwrite)`."""
  apart_from_inputs(flag, path, inputs)
  paths.check_writable(path)
  if not overwrite and paths.exists(path) and not (paths.is_dir(path) and not paths.listdir(path)):
    raise ValueError(f"{flag} {path} already exists: give a new (or empty) folder, or add --overwrite to "
                     "replace it")


def check_resumable_folder(flag: str, path: str, marker: str, inputs: dict[str, str | None]) -> None:
  """Before anything loads: an output folder a command adds to and resumes (a run's workdir, an
  evaluation, a feature cache) must be new, empty, or one the command wrote (holding `marker`); it
  must not be or hold an input, and must be writable where it is. ValueError or OSError otherwise."""
  apart_from_inputs(flag, path, inputs)
  if paths.is_file(path):
    raise ValueError(f"{flag} {path} is a file: give a folder")
  if paths.is_dir(path) and paths.listdir(path) and not paths.exists(paths.join(path, marker)):
    raise ValueError(f"{flag} {path} holds other files (it has no {marker}, so it is not this command's output): "
                     "give a new or empty folder")
  paths.check_writable(path)


# Set before jax, libtpu and transformers are imported: their loggers read the environment once.
QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "2",       # XLA's (and TensorFlow's) C++ logs: errors only
    "TPU_STDERR_LOG_LEVEL": "2",       # libtpu: errors only
    "TPU_MIN_LOG_LEVEL": "2",
    "GRPC_VERBOSITY": "ERROR",         # multi-host coordination
    "GLOG_minloglevel": "2",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",               # progress bars
}
NOISY_MODULES = ("jax", "jaxlib", "flax", "orbax", "optax", "grain", "tensorflow_datasets", "transformers", "torch")


def recipe_flag(parser) -> None:
  """`--config FILE[:ARG]`: a training recipe (the commands that take `--config.a.b=VALUE` overrides)."""
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                      help="training config and its get_config argument, e.g. configs/video_llama.py:stage1")


def quiet_flag(parser, default=False) -> None:
  parser.add_argument("-q", "--quiet", action="store_true", default=default,
                      help="only answers, notes and errors: no progress bars, no log lines from XLA, libtpu, "
                           "absl or the video decoder (also VLLM_JAX_QUIET=1)")


def silence() -> None:
  """Quiet mode, for this process and its children: call before jax is imported. Settings the
  user made in the environment are kept."""
  import logging
  import warnings
  os.environ["VLLM_JAX_QUIET"] = "1"
  for key, value in QUIET_ENVIRONMENT.items():
    os.environ.setdefault(key, value)
  for module in NOISY_MODULES:
    warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "no GPU/TPU found, falling back to cpu"
  from absl import logging as absl_logging  # orbax logs through absl
  absl_logging.set_verbosity(absl_logging.ERROR)
  import decord  # FFmpeg's own lines ("[h264 @ 0x...] ..."): a file it cannot read still ends in our error line
  decord.logging.set_level(decord.logging.FATAL)


def error(message: str) -> int:
  """Print one `error:` line; the command's exit status (2)."""
  print(f"error: {message}", file=sys.stderr)
  return 2


def mesh(spec: str | None):
  if not spec:
    return None
  from vllm_jax.train.sharding import make_mesh
  return make_mesh(tuple(int(s) for s in spec.split(",")))


def load_system(args):
  """The model folder `args.model` as its system (`vllm_jax.systems`), restored onto `--mesh`."""
  from vllm_jax import systems
  return systems.load(args.model, mesh=mesh(args.mesh), dtype=args.dtype)


def use_audio(args, system) -> bool | None:
  """--audio/--no-audio, by default on when the model has an audio branch; None: impossible."""
  if args.audio and not system.has_audio:
    return None
  return system.has_audio if args.audio is None else args.audio


def sampling(args):
  from vllm_jax.generate import SamplingConfig
  return SamplingConfig(args.temperature, args.top_k, args.top_p)


def number(kind, low=None, high=None, low_open=False):
  """An argparse type: `kind` within [low, high] (or (low, high] with `low_open`)."""
  rule = config_check.Number(kind, low, high, low_open)

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not {config_check.Number(kind).describe()}") from None
    problem = rule.problem(value)
    if problem:
      raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return value
  return parse


def sampling_flags(parser) -> None:
  parser.add_argument("--max-new-tokens", type=number(int, 1), default=128)
  parser.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy (default)")
  parser.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0,
                      help="nucleus sampling mass in (0, 1] (1 = off)")
  parser.add_argument("--top-k", type=number(int, 0), default=0, help="sample among the k best tokens (0 = off)")
  parser.add_argument("--seed", type=int, default=0)
  model_flags(parser)


def model_flags(parser) -> None:
  """How `load_system` loads the --model folder."""
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  parser.add_argument("--mesh", default=None,
                      help="data,fsdp,tensor mesh sizes, e.g. 1,1,-1 for tensor parallel over all devices")


def media_flags(parser) -> None:
  parser.add_argument("--audio", action=argparse.BooleanOptionalAction, default=None,
                      help="use the video's audio track (default: when the model has an audio branch)")
  parser.add_argument("--num-frames", type=number(int, 1), default=None,
                      help="frames sampled per video (default: the model's; LLaMA-VID: at most this many "
                           "of its frames at 1 fps, evenly spread)")


def answer_or_loop(answer, question: str | None, seed: int, hint: str) -> int:
  """`answer(question, seed)` once, or, without a question, for each line typed until an empty
  line or Ctrl-D (seed + turn for the turn-th)."""
  if question is not None:
    answer(question, seed)
    return 0
  print(f"{hint}; an empty line or Ctrl-D quits.", file=sys.stderr)
  for turn in range(sys.maxsize):
    try:
      line = input("> ").strip()
    except EOFError:
      break
    if not line:
      break
    answer(line, seed + turn)
  return 0


def load_config(spec: str, overrides: list[str]):
  """`FILE[:ARG]` -> FILE's get_config(ARG), then each `--config.a.b=VALUE` applied. FILE is local."""
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    raise ValueError(f"--config {spec!r}: expected a .py file, optionally with :ARG")
  if not paths.is_file(path):
    raise FileNotFoundError(f"--config {spec!r}: no such file: {path}")
  module_spec = importlib.util.spec_from_file_location("train_config", paths.resolve(path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg else module.get_config()
  for override in overrides:
    key, eq, value = override.removeprefix("--config.").partition("=")
    if not override.startswith("--config.") or not eq:
      raise ValueError(f"unrecognised argument {override!r}; overrides look like --config.train.steps=100")
    node, name = _parent(cfg, key, spec)
    if isinstance(node[name], ml_collections.ConfigDict):
      raise ValueError(f"--config.{key}={value}: {key} is a section ({', '.join(list(node[name])[:4])}, ...): "
                       f"set its fields, e.g. --config.{key}.{next(iter(node[name]), 'field')}=...")
    node[name] = _coerce(value, node[name], key)
  config_check.check(cfg)
  return cfg


def _parent(cfg, key: str, spec: str):
  """-> (the section holding field `key` of `cfg`, the field's name); a key the config lacks (a
  misspelling, a section that is None in this recipe) is a ValueError that says so."""
  *parents, name = key.split(".")
  node = cfg
  for depth, part in enumerate(parents + [name]):
    where = ".".join(parents[:depth])
    if node is None:
      raise ValueError(f"--config.{key}: {where} is not set (None) in {spec}, so it has no field {part!r}")
    if not isinstance(node, ml_collections.ConfigDict):
      raise ValueError(f"--config.{key}: {where} is a value ({node!r}), not a section")
    if part not in node:
      close = difflib.get_close_matches(part, list(node), n=1)
      hint = f"; did you mean {'.'.join(parents[:depth] + close)}?" if close else f"; it has {', '.join(node)}"
      raise ValueError(f"--config.{key}: the config has no {'section' if depth < len(parents) else 'field'} "
                       f"{'.'.join(parents[:depth] + [part])}{hint}")
    if depth < len(parents):
      node = node[part]
  return node, name


def _coerce(value: str, current, key: str):
  """The override string as the type of the field's current value."""
  try:
    if isinstance(current, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
      return value.lower() in ("true", "1")
    if isinstance(current, (int, float)):
      return type(current)(value)
    if isinstance(current, (tuple, list)):
      if value[:1] in "([":
        return type(current)(ast.literal_eval(value))
      kind = type(current[0]) if current else str
      return type(current)(kind(v) for v in value.split(",") if v)
  except (ValueError, SyntaxError) as e:
    kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(current), "a list")
    raise ValueError(f"--config.{key}={value}: must be {kind}") from e
  return value
