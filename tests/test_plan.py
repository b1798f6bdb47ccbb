"""`vllm-jax plan`: the train step of a recipe compiled without weights for the test's 8 fake CPU
devices (memory table, FLOPs), its error lines, and `batch_spec` against a real decoded batch."""

import csv
import os
import re

import numpy as np
import pytest

from test_video_loading import write_video
from vllm_jax import cli
from vllm_jax.configs.video_llama import get_config, model_config
from vllm_jax.data import conversation as C
from vllm_jax.data import datasets
from vllm_jax.data.tokenizer import train_tokenizer
from vllm_jax.systems.video_llama import VideoLlamaSystem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plan(capsys, recipe, *flags):
  status = cli.main(["plan", "--config", os.path.join(ROOT, "configs", recipe), *flags])
  out, err = capsys.readouterr()
  return status, out, err


def figure(out, name):
  """The memory row `name` in bytes."""
  value, unit = re.search(rf"^  {name}\s+([\d.]+) (KiB|MiB|GiB)", out, re.M).groups()
  return float(value) * 1024 ** {"KiB": 1, "MiB": 2, "GiB": 3}[unit]


@pytest.mark.parametrize("recipe, flags", [("video_llama.py:tiny_stage1", ("--cpu-devices", "8")),
                                           ("video_llava.py:tiny_stage2", ("--mesh", "4,2,1", "--batch", "16"))])
def test_plan_prints_memory_and_flops(capsys, recipe, flags):
  status, out, err = plan(capsys, recipe, *flags)
  assert status == 0, err
  assert "8 x cpu" in out
  for row in ("arguments", "outputs", "peak"):
    assert figure(out, row) > 0, out
  flops = re.search(r"^FLOPs per step\s+(\S+)", out, re.M).group(1)
  assert float(flops) > 0, out
  if "video_llava" in recipe:
    assert "mesh data 4 x fsdp 2 x tensor 1" in out and "input_ids [16, 320] int32" in out
    assert "attention xla (attention_impl auto; 320 tokens)" in out  # auto on CPU devices


def test_plan_errors_are_one_line(capsys, tmp_path):
  status, out, err = plan(capsys, "video_llama.py:tiny_stage1", "--batch", "12")
  assert status == 2 and out == ""
  assert err.strip().count("\n") == 0 and "batch 12 does not divide over the mesh's 8 data-parallel devices" in err
  status, out, err = plan(capsys, "video_llama.py:tiny_stage1", "--topology", "v9:2x2")
  assert status == 2 and err.strip().count("\n") == 0 and "unknown topology 'v9:2x2'" in err
  status, out, err = plan(capsys, "video_llama.py:tiny_stage1", "--topology", "v5e:2x4",
                          "--libtpu-dir", str(tmp_path))
  assert status == 2 and err.strip().count("\n") == 0
  assert f"pip install --target {tmp_path} 'libtpu==" in err


def test_batch_spec_matches_a_decoded_batch(tmp_path):
  """Video-LLaMA with audio: captions of real mp4s, batched as training batches them."""
  captions = ["a red circle moves to the left", "a dog runs on the beach", "waves crash on rocks",
              "a cat sleeps on a sofa"]
  tokenizer = train_tokenizer(captions * 20, str(tmp_path / "tokenizer"), vocab_size=300)
  video_id, audio_id = C.add_media_tokens(tokenizer)
  config = model_config("tiny").replace(video_token_id=video_id, audio_token_id=audio_id)
  rows = []
  for i, caption in enumerate(captions):
    os.makedirs(tmp_path / "videos" / "000", exist_ok=True)
    write_video(tmp_path / "videos" / "000" / f"{i}.mp4", num_frames=8, size=(32, 32), audio_seconds=1.0)
    rows.append(dict(videoid=i, name=caption, page_dir="000"))
  with open(tmp_path / "webvid.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, ["videoid", "name", "page_dir"])
    writer.writeheader()
    writer.writerows(rows)
  cfg = get_config("tiny_stage1")
  cfg.data.update(webvid_csv=str(tmp_path / "webvid.csv"), webvid_dir=str(tmp_path / "videos"), with_audio=True)
  cfg.train.batch_size = 4
  batch = next(iter(datasets.batches(VideoLlamaSystem.dataset(cfg, config, str(tmp_path / "tokenizer")), 4)))
  batch.pop("skipped", None)
  spec = VideoLlamaSystem.batch_spec(cfg, config)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in spec.items()} == \
         {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert set(spec) == {"frames", "frame_mask", "input_ids", "labels", "attention_mask", "audio"}


def test_plan_generate_compiles_prefill_and_decode(capsys):
  status, out, err = plan(capsys, "video_llava.py:tiny_stage2", "--mesh", "2,2,2", "--generate", "--batch", "4",
                          "--context", "1024")
  assert status == 0, err
  assert "generation  4 rows, a 1024-slot KV cache each, float32 weights" in out
  for row in ("weights", "KV cache"):
    assert figure(out, row) > 0, out
  from vllm_jax.configs.video_llava import model_config as llava_model
  from vllm_jax.train.flops import llama_forward_flops
  c = llava_model("tiny").llama
  # The KV cache: K and V of every layer, 4 rows over data x fsdp, heads over tensor, fp32 (the
  # table rounds to 0.001 MiB).
  kv = 2 * c.num_layers * 4 * 1024 * c.num_kv_heads * c.head_dim * 4 / 8
  assert figure(out, "KV cache") == pytest.approx(kv, abs=1024)
  # Against the analytic count: the attention of each query spans the whole cache; a prefill piece
  # computes no logits.
  attention = lambda rows, queries, keys: 4 * rows * queries * keys * c.num_heads * c.head_dim * c.num_layers
  logits = lambda rows, queries: 2 * rows * queries * c.hidden_size * c.vocab_size
  prefill = llama_forward_flops(c, 4, 512) - attention(4, 512, 512) + attention(4, 512, 1024) - logits(4, 512)
  decode = llama_forward_flops(c, 4, 1) - attention(4, 1, 1) + attention(4, 1, 1024)
  found = re.search(r"prefill piece (\S+), decode step (\S+) ", out)
  assert (float(found.group(1)), float(found.group(2))) == pytest.approx((prefill, decode), rel=1e-3), out
  status, out, err = plan(capsys, "video_llava.py:tiny_stage2", "--cpu-devices", "8", "--generate", "--batch", "3")
  assert status == 2 and "3 rows do not divide over the mesh's 8 data-parallel devices" in err
  status, out, err = plan(capsys, "video_llava.py:tiny_stage2", "--context", "1024")
  assert status == 2 and err.strip() == "error: --context sizes the KV cache of --generate: add --generate"
