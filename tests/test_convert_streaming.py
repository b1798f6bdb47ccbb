"""`convert_hf` streams an HF LLaMA into a model folder: the converting process holds about one tensor,
never the model, and the folder loads as what `load_hf` + `save_llama` write."""

import itertools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from vllm_jax import pretrained
from vllm_jax.converters import llama as llama_conv
from vllm_jax.converters.core import expected_source_shapes, write_safetensors_shards

# embed_tokens and lm_head are 256 MiB each in bf16, each decoder layer 65 MiB: tensors this big
# keep the process's fixed overhead (some 60 MiB) well inside the half tensor the bound allows.
BIG = dict(vocab_size=65536, hidden_size=2048, intermediate_size=2752, num_hidden_layers=2,
           num_attention_heads=16, num_key_value_heads=16)
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=88, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, attention_bias=True)

# the converting process reports its own peak (VmHWM): a spawned child's ru_maxrss starts at pytest's
MEASURE = """
import json, sys
import torch
from vllm_jax.converters import llama
def status(field):
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024
baseline = status("VmRSS")
llama.convert_hf(sys.argv[1], sys.argv[2], param_dtype="bfloat16", progress=False)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
"""


def write_hf(folder, fmt: str, max_shard_bytes: int, **sizes) -> dict[str, tuple[int, ...]]:
  """A random bf16 HF LLaMA folder in several shards (safetensors with an index, or .bin), one shard
  in memory at a time. -> the shape of every tensor."""
  os.makedirs(folder)
  hf = dict(hidden_act="silu", max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, **sizes)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f)
  config = llama_conv.config_from_hf(hf)
  shapes = expected_source_shapes(llama_conv.rules(config), nn.meta.unbox(llama_conv.abstract_params(config)))
  rng = np.random.default_rng(0)
  # finite bf16 values of random sign, exponent (2 bits) and mantissa; quicker to make than normal ones
  tensors = ((k, ((rng.integers(0, 1 << 16, s, dtype=np.uint16) & 0x81FF) | 0x3C00).view(ml_dtypes.bfloat16))
             for k, s in shapes.items())
  if fmt == "safetensors":
    assert len(write_safetensors_shards(tensors, folder, max_shard_bytes)) > 1
  else:
    shard, size, count = {}, 0, 0
    for key, value in itertools.chain(tensors, [(None, None)]):
      if shard and (key is None or size + value.nbytes > max_shard_bytes):
        count += 1
        torch.save(shard, os.path.join(folder, f"pytorch_model-{count:05d}.bin"))
        shard, size = {}, 0
      if key is not None:
        shard[key] = torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
        size += value.nbytes
    assert count > 1
  return shapes


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_peak_memory_is_about_one_tensor(tmp_path, fmt):
  src, out = str(tmp_path / "hf"), str(tmp_path / "out")
  shapes = write_hf(src, fmt, 320 << 20, **BIG)
  largest = max(2 * int(np.prod(s)) for s in shapes.values())
  total = sum(2 * int(np.prod(s)) for s in shapes.values())
  assert largest == 256 << 20 and total > 2.4 * largest
  proc = subprocess.run([sys.executable, "-c", MEASURE, src, out], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  rss = json.loads(proc.stdout.strip().splitlines()[-1])
  growth = rss["peak"] - rss["baseline"]
  assert growth <= 1.5 * largest, f"peak grew {growth / 2**20:.0f} MiB; largest tensor {largest / 2**20:.0f} MiB"
  assert os.path.isdir(os.path.join(out, "params"))  # its contents: test_streamed_folder_loads_as_the_eager_one


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_streamed_folder_loads_as_the_eager_one(tmp_path, fmt, dtype):
  src = str(tmp_path / "hf")
  write_hf(src, fmt, 16 << 10, **SMALL)
  config, params = llama_conv.load_hf(src, param_dtype=dtype, progress=False)
  pretrained.save_llama(str(tmp_path / "eager"), config, params)
  streamed_config, lazy = llama_conv.convert_hf(src, str(tmp_path / "streamed"), param_dtype=dtype, progress=False)
  assert streamed_config == config
  assert jax.tree.map(lambda x: (x.shape, x.dtype), lazy) == jax.tree.map(lambda x: (x.shape, x.dtype), params)
  eager_config, eager, _ = pretrained.load_llama(str(tmp_path / "eager"))
  back_config, back, _ = pretrained.load_llama(str(tmp_path / "streamed"))
  assert back_config == eager_config == config
  assert jax.tree.structure(back) == jax.tree.structure(eager)
  for got, want, converted in zip(jax.tree.leaves(back), jax.tree.leaves(eager), jax.tree.leaves(params)):
    assert got.dtype == want.dtype == converted.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got), converted)
