"""Bad invocations of `vllm-jax`, each in its own process as a user runs it: exit status 2, one
`error:` line that says what is wrong, and no traceback."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from vllm_jax.converters.core import write_safetensors

FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """An HF LLaMA folder (unconverted), one without weights, one with a truncated shard, one whose
  tensor has the wrong shape, and a media file."""
  root = tmp_path_factory.mktemp("cli_errors")
  torch.manual_seed(0)
  hf = LlamaForCausalLM(HFLlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2))
  hf.save_pretrained(str(root / "hf"))
  config = (root / "hf" / "config.json").read_text()
  for name in ("no_weights", "truncated", "misshaped"):
    (root / name).mkdir()
    (root / name / "config.json").write_text(config)
  shard = (root / "hf" / "model.safetensors").read_bytes()
  (root / "truncated" / "model.safetensors").write_bytes(shard[:len(shard) // 2])
  tensors = [(k, v.detach().numpy()) for k, v in hf.state_dict().items()]
  tensors = [(k, np.zeros((65, 16), np.float32) if k == "model.embed_tokens.weight" else v) for k, v in tensors]
  write_safetensors(tensors, str(root / "misshaped" / "model.safetensors"))
  (root / "questions.jsonl").write_text(json.dumps({"video": "a.mp4", "question": "?"}) + "\n")
  return root


def run(*args, devices: int = 1):
  env = dict(os.environ, XLA_FLAGS=f"{FAST} --xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, "-m", "vllm_jax.cli", *map(str, args)], capture_output=True, text=True,
                        timeout=300, env=env)
  return proc.returncode, proc.stderr


@pytest.mark.parametrize("case,message", [
    ("chat_missing_model", "error: model folder not found"),
    ("chat_unconverted", "is not a vllm_jax model folder (a Hugging Face one?)"),
    ("chat_temperature", "argument --temperature: -1: must be a finite number of at least 0"),
    ("chat_top_p", "argument --top-p: 2: must be a finite number in (0, 1]"),
    ("chat_max_new_tokens", "argument --max-new-tokens: 0: must be an integer of at least 1"),
    ("chat_missing_video", "error: media file not found"),
    ("infer_batch_size", "argument --batch-size: 0: must be an integer of at least 1"),
    ("infer_output_folder", "argument --output: the folder of"),
    ("convert_missing", "argument --hf-dir: no such folder"),
    ("convert_no_weights", "no *.safetensors or *.bin weight files in"),
    ("convert_truncated", "model.safetensors is truncated: its tensors need"),
    ("convert_misshaped", "shape mismatch for model.embed_tokens.weight: checkpoint has [65, 16]"),
    ("convert_al_without_imagebind", "--al needs --imagebind imagebind_huge.pth"),
    ("infer_media_root", "argument --media-root: no such folder"),
    ("convert_llava_config", "argument --config: invalid choice: '13b'"),
])
def test_bad_invocation_is_one_error_line(folders, tmp_path, case, message):
  root = folders
  questions = root / "questions.jsonl"
  args = {
      "chat_missing_model": ["chat", "--model", root / "nope", "--question", "hi"],
      "chat_unconverted": ["chat", "--model", root / "hf", "--question", "hi"],
      "chat_temperature": ["chat", "--model", root / "hf", "--temperature", "-1"],
      "chat_top_p": ["chat", "--model", root / "hf", "--top-p", "2"],
      "chat_max_new_tokens": ["chat", "--model", root / "hf", "--max-new-tokens", "0"],
      "chat_missing_video": ["chat", "--model", root / "hf", "--video", root / "nope.mp4"],
      "infer_batch_size": ["infer", "--model", root / "hf", "--input", questions, "--output", tmp_path / "a.jsonl",
                           "--batch-size", "0"],
      "infer_output_folder": ["infer", "--model", root / "hf", "--input", questions, "--output",
                              tmp_path / "no" / "a.jsonl"],
      "convert_missing": ["convert", "llama", "--hf-dir", root / "nope", "--out", tmp_path / "out"],
      "convert_no_weights": ["convert", "llama", "--hf-dir", root / "no_weights", "--out", tmp_path / "out"],
      "convert_truncated": ["convert", "llama", "--hf-dir", root / "truncated", "--out", tmp_path / "out"],
      "convert_misshaped": ["convert", "llama", "--hf-dir", root / "misshaped", "--out", tmp_path / "out"],
      "convert_al_without_imagebind": ["convert", "video-llama", "--llama-dir", root / "hf", "--al", "al.pth",
                                       "--out", tmp_path / "out"],
      "infer_media_root": ["infer", "--model", root / "hf", "--input", questions, "--output", tmp_path / "a.jsonl",
                           "--media-root", root / "nope"],
      "convert_llava_config": ["convert", "video-llava", "--original", root / "hf", "--config", "13b",
                               "--out", tmp_path / "out"],
  }[case]
  status, err = run(*args)
  assert status == 2, err
  assert "Traceback" not in err and message in err, err
  assert sum(line.startswith("error:") or ": error: " in line for line in err.splitlines()) == 1, err


def test_a_mesh_that_does_not_divide_the_model_names_its_parameters(folders, tmp_path):
  """2 attention heads over a tensor axis of 4: refused before any tensor is read."""
  model = tmp_path / "llama"
  status, err = run("convert", "llama", "--hf-dir", folders / "hf", "--out", model)
  assert status == 0, err
  status, err = run("chat", "--model", model, "--mesh", "1,1,4", "--question", "hi", devices=4)
  assert status == 2 and "Traceback" not in err, err
  assert ("error: the mesh (data 1 x fsdp 1 x tensor 4) does not divide" in err
          and "layers/attn/q/kernel [1, 16, 2, 8] (axis 2 over tensor = 4)" in err), err


def test_version():
  proc = subprocess.run([sys.executable, "-m", "vllm_jax.cli", "--version"], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout.startswith("vllm-jax ")
