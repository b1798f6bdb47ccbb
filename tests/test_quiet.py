"""Quiet mode and the load progress bar, through the command in a fresh process (the C++ loggers
read their settings when jax and decord start): a model folder loads with a progress bar and a
corrupt video makes FFmpeg print its own lines; `--quiet` / VLLM_JAX_QUIET=1 leave only the error line."""

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from vllm_jax import cli
from vllm_jax.configs.video_llama import model_config
from vllm_jax.data.tokenizer import train_tokenizer
from vllm_jax.systems.video_llama import VideoLlamaSystem

FFMPEG_LINE = re.compile(r"^\[[\w,]+ @ 0x[0-9a-f]+\]", re.M)  # "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55...] moov atom..."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny random vision-only Video-LLaMA folder and a corrupt mp4."""
  root = tmp_path_factory.mktemp("quiet")
  tokenizer = train_tokenizer(["###Human: What is moving?\n###Assistant: A red circle moves left.\n"] * 20,
                              str(root / "tokenizer"), vocab_size=300)
  video_id, audio_id = VideoLlamaSystem.add_media_tokens(tokenizer)
  config = model_config("tiny").replace(audio=None, video_token_id=video_id, audio_token_id=audio_id)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype),
                        nn.meta.unbox(VideoLlamaSystem.abstract_params(config)))
  model = str(root / "model")
  VideoLlamaSystem(config, params, tokenizer).save(model)
  corrupt = root / "corrupt.mp4"
  corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 50)
  return model, str(corrupt)


def vllm_jax(*args, quiet_env=False):
  env = {k: v for k, v in os.environ.items() if k != "VLLM_JAX_QUIET"}
  if quiet_env:
    env["VLLM_JAX_QUIET"] = "1"
  return subprocess.run([sys.executable, "-m", "vllm_jax.cli", *args], capture_output=True, text=True, env=env,
                        timeout=600)


def test_load_shows_progress_and_a_bad_video_shows_decoder_lines(files):
  model, corrupt = files
  run = vllm_jax("chat", "--model", model, "--video", corrupt, "--question", "What?")
  assert run.returncode == 2
  assert re.search(rf"loading {re.escape(model)}: 100%.*B/s", run.stderr)
  assert FFMPEG_LINE.search(run.stderr), run.stderr
  assert re.search(r"^error: cannot decode video .*corrupt\.mp4", run.stderr, re.M)


@pytest.mark.parametrize("args,quiet_env", [(("--quiet", "chat"), False), (("chat", "-q"), False),
                                            (("chat",), True)], ids=["--quiet", "chat -q", "VLLM_JAX_QUIET"])
def test_quiet_leaves_the_error_line(files, args, quiet_env):
  model, corrupt = files
  run = vllm_jax(*args, "--model", model, "--video", corrupt, "--question", "What?", quiet_env=quiet_env)
  assert run.returncode == 2
  assert "loading" not in run.stderr and not FFMPEG_LINE.search(run.stderr), run.stderr
  assert re.search(r"^error: cannot decode video .*corrupt\.mp4", run.stderr, re.M)
  assert run.stdout == ""


def test_help_names_quiet_mode():
  text = " ".join(cli.build_parser().format_help().split())
  assert "-q, --quiet" in text and "VLLM_JAX_QUIET=1" in text
