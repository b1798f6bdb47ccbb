"""The `vllm-jax` command: one module per command, shared flags in `flags`."""

import argparse
import logging
import os
import sys
from importlib.metadata import version

from vllm_jax import quiet
from vllm_jax.cli import (cache_features, chat, convert, demo, eval, export, infer, make_feature_files, make_manifest,
                          plan, serve, train, web)
from vllm_jax.cli.flags import error, load_config, quiet_flag, silence
from vllm_jax.paths import os_error_message

__all__ = ["build_parser", "load_config", "main"]

EPILOG = """examples:
  vllm-jax demo                      # train a tiny audio-visual Video-LLaMA on synthetic videos (~10 min, CPU)
  vllm-jax convert llama --hf-dir ./vicuna-7b --out ./models/vicuna-7b
  vllm-jax chat --model ./models/vicuna-7b --question "What is a llama?"
  vllm-jax convert video-llama --config 7b --llama-dir ./vicuna-7b --eva-vit eva_vit_g.pth \\
      --blip2 blip2_pretrained_flant5xxl.pth --vl finetune-vicuna7b-v2.pth \\
      --al finetune_vicuna7b_audiobranch.pth --imagebind imagebind_huge.pth --out ./models/video-llama-7b
  vllm-jax convert video-llava --hf-dir ./Video-LLaVA-7B-hf --out ./models/video-llava-7b
  vllm-jax convert llama-vid --model-dir ./llama-vid-7b-full-224-video-fps-1 --eva-vit eva_vit_g.pth \\
      --bert-tokenizer ./bert-base-uncased --out ./models/llama-vid-7b
  vllm-jax chat --model ./models/video-llama-7b --video clip.mp4 --question "What happens?"
  vllm-jax web --model ./models/video-llama-7b --port 7860   # chat in the browser (pip install -e '.[web]')
  vllm-jax infer --model ./models/video-llava-7b --input questions.jsonl --output answers.jsonl
  vllm-jax serve --model ./models/video-llava-7b --port 8000   # OpenAI-compatible /v1/chat/completions
  vllm-jax eval --model ./models/video-llava-7b --format open-ended --annotations msvd/test_qa.json \\
      --media-root msvd/videos --out ./runs/msvd-qa     # per-category exact match, F1; resumable
  vllm-jax train --config configs/video_llama.py:stage1 --config.init_from=./models/video-llama-7b \\
      --config.data.webvid_csv=webvid/results_2M_train.csv --config.data.webvid_dir=webvid/videos \\
      --config.train.workdir=./runs/stage1
  vllm-jax make-manifest --format webvid --annotations webvid/results_10M_train.csv --media-root webvid/videos \\
      --out webvid/manifest   # then --config.data.webvid_csv=webvid/manifest (0.35 GiB a process, not 4.5)
  vllm-jax make-feature-files --model ./models/llama-vid-7b-long movie.mp4 --out features   # + movie.srt
  vllm-jax cache-features --config configs/video_llama.py:stage1 --config.init_from=... --out ./cache/stage1
  vllm-jax plan --config configs/video_llama.py:stage1 --topology v5e:2x4   # fits? memory, FLOPs, step time
  vllm-jax export --workdir ./runs/stage2_lora --out ./models/video-llava-lora --peft ./adapters/lora
  vllm-jax convert peft --model ./models/video-llava-7b --adapter ./adapters/lora --out ./models/with-lora
"""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="vllm-jax", description="Video LLMs in JAX/Flax: convert weights, chat, train.",
      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--version", action="version", version=f"%(prog)s {version('vllm_jax')}")
  quiet_flag(parser)
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for module in (convert, chat, infer, eval, serve, train, make_manifest, make_feature_files, cache_features, plan,
                 export, demo, web):
    module.add_parser(commands)
  quiet_everywhere(commands)
  return parser


def quiet_everywhere(commands) -> None:
  """`vllm-jax chat -q ...` and `vllm-jax convert llama -q ...` too; unset there, -q leaves the
  top-level value."""
  for command in commands.choices.values():
    quiet_flag(command, default=argparse.SUPPRESS)
    for action in command._actions:  # pylint: disable=protected-access  (argparse keeps subcommands there)
      if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
        quiet_everywhere(action)


def main(argv: list[str] | None = None) -> int:
  """Bad input ends in one `error:` line and status 2, Ctrl-C in status 130, a closed output
  pipe in 141; VLLM_JAX_TRACEBACK=1 shows the traceback instead."""
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if extra and not getattr(args, "takes_overrides", False):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  if args.quiet or quiet():
    silence()  # before any command imports jax
  # orbax logs its per-save chatter through absl, and a failed save's traceback from each of its
  # threads (absl) and each of its write tasks (asyncio's "exception was never retrieved"); the
  # failure reaches the command as one exception, its one error line, all the same.
  for logger in ("absl", "asyncio"):
    logging.getLogger(logger).setLevel(logging.WARNING if os.environ.get("VLLM_JAX_TRACEBACK") else logging.CRITICAL)
  try:
    return args.run(args, extra) if getattr(args, "takes_overrides", False) else args.run(args)
  except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    return 130
  except BrokenPipeError:  # the reader left (`... | head`): end quietly, as a command killed by SIGPIPE
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
    return 141
  except (OSError, ValueError) as e:  # bad input, a store out of reach, a full disk, a read-only folder
    if os.environ.get("VLLM_JAX_TRACEBACK"):
      raise
    return error(os_error_message(e) if isinstance(e, OSError) else str(e))
  except RuntimeError as e:
    if os.environ.get("VLLM_JAX_TRACEBACK") or not str(e).startswith("Unable to initialize backend"):
      raise
    platforms = os.environ.get("JAX_PLATFORMS")  # a platform asked for that this machine lacks
    return error(f"{str(e).split(':')[0]}{f' (JAX_PLATFORMS={platforms})' if platforms else ''}: this machine "
                 "has no such device, or its driver is missing; unset JAX_PLATFORMS to use what it has")
