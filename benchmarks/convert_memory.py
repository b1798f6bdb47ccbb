"""`convert llama` on a checkpoint of Llama-2-7B's tensor sizes: peak memory against the largest
tensor, and throughput.

Writes an HF folder with Llama-2-7B's keys and shapes (hidden 4096, intermediate 11008, vocab 32000,
bf16 as released; random finite values with about as many random bits as real weights, so the
output compresses as real ones do) a tensor at a time, then converts it in a fresh process per way:

  stream: `converters.llama.convert_hf`, each tensor read, converted and written on its own
  eager:  `load_hf` then `pretrained.save_llama`, the whole tree in memory (--eager; it needs
          several times the model's size, so use it with a few --layers)

The converting process reports its baseline (its RSS after its imports, before converting) and its
peak RSS (VmHWM).
The bound checked is peak - baseline <= 1.5 x the largest tensor (as read, or as written when --dtype
widens it). --layers N keeps every tensor's full size with fewer layers, when the disk is short (the
full 32 layers need 13.5 GB for the source and about as much for the output).

  python benchmarks/convert_memory.py [--layers 32] [--dtype bfloat16] [--format safetensors|bin] [--eager]
                                      [--work-dir DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HIDDEN, INTERMEDIATE, VOCAB = 4096, 11008, 32000
BOUND = 1.5


def llama2_7b_shapes(layers: int) -> dict[str, tuple[int, ...]]:
  shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
  for i in range(layers):
    layer = f"model.layers.{i}."
    shapes.update({layer + f"self_attn.{n}_proj.weight": (HIDDEN, HIDDEN) for n in "qkvo"})
    shapes.update({layer + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
                   layer + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                   layer + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
                   layer + "input_layernorm.weight": (HIDDEN,),
                   layer + "post_attention_layernorm.weight": (HIDDEN,)})
  shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
  return shapes


def random_bf16(rng: np.random.Generator, shape) -> np.ndarray:
  """bf16 bit patterns: random sign, 2 random exponent bits around 2^-7, random 7-bit mantissa."""
  bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
  return (bits & 0x81FF) | 0x3C00


def shard_names(shapes: dict, shard_bytes: int, ext: str) -> dict[str, str]:
  """Key -> shard file, filling shards in key order as save_pretrained does."""
  groups, size = [[]], 0
  for key, shape in shapes.items():
    nbytes = 2 * int(np.prod(shape))
    if groups[-1] and size + nbytes > shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(key)
    size += nbytes
  prefix = "model" if ext == "safetensors" else "pytorch_model"
  return {key: f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.{ext}" for i, group in enumerate(groups) for key in group}


def write_safetensors_streamed(path: str, keys: list[str], shapes: dict, rng: np.random.Generator) -> None:
  """A safetensors file whose header is written first, then each tensor as it is made."""
  header, offset = {}, 0
  for key in keys:
    nbytes = 2 * int(np.prod(shapes[key]))
    header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob)
    for key in keys:
      f.write(random_bf16(rng, shapes[key]).tobytes())


def write_bin(path: str, keys: list[str], shapes: dict, rng: np.random.Generator) -> None:
  import torch
  state = {key: torch.from_numpy(random_bf16(rng, shapes[key]).view(np.int16)).view(torch.bfloat16) for key in keys}
  torch.save(state, path)


def make_checkpoint(folder: str, layers: int, fmt: str, shard_bytes: int) -> dict[str, tuple[int, ...]]:
  os.makedirs(folder, exist_ok=True)
  shapes = llama2_7b_shapes(layers)
  ext = "safetensors" if fmt == "safetensors" else "bin"
  files = shard_names(shapes, shard_bytes, ext)
  rng = np.random.default_rng(0)
  for name in sorted(set(files.values())):
    keys = [k for k, f in files.items() if f == name]
    (write_safetensors_streamed if ext == "safetensors" else write_bin)(os.path.join(folder, name), keys, shapes, rng)
  index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
  total = sum(2 * int(np.prod(s)) for s in shapes.values())
  with open(os.path.join(folder, index), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": files}, f, indent=2)
  config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": VOCAB,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return shapes


def child(way: str, src: str, out: str, dtype: str | None) -> None:
  """Runs in the measured process: imports, the baseline, then one conversion."""
  import torch  # noqa: F401  (the .bin reader needs it; imported before the baseline either way)

  from vllm_jax import pretrained
  from vllm_jax.converters import llama
  baseline = status_mib("VmRSS")
  start = time.perf_counter()
  if way == "stream":
    llama.convert_hf(src, out, param_dtype=dtype, progress=False)
  else:
    config, params = llama.load_hf(src, param_dtype=dtype, progress=False)
    pretrained.save_llama(out, config, params)
  wall = time.perf_counter() - start
  print(json.dumps({"baseline_mib": baseline, "peak_mib": status_mib("VmHWM"), "wall_s": wall}))


def status_mib(field: str) -> float:
  """VmRSS (now) or VmHWM (the peak) of this process. Not ru_maxrss: a spawned child's starts at its
  parent's peak."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def convert(way: str, src: str, out: str, dtype: str | None) -> dict:
  """One conversion in its own process -> its baseline and peak RSS (MiB) and wall seconds."""
  shutil.rmtree(out, ignore_errors=True)
  cmd = [sys.executable, __file__, "--child", way, src, out, dtype or ""]
  with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
    if subprocess.run(cmd, stdout=stdout, stderr=stderr, env={**os.environ, "JAX_PLATFORMS": "cpu"}).returncode:
      stderr.seek(0)
      raise SystemExit(f"{way} conversion failed:\n{stderr.read()[-3000:]}")
    stdout.seek(0)
    return json.loads(stdout.read().strip().splitlines()[-1])


def folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    way, src, out, dtype = sys.argv[2:6]
    return child(way, src, out, dtype or None)
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=32, help="decoder layers, each at full size (7B: 32)")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                      help="the converted parameters' dtype (`convert llama --dtype`)")
  parser.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
  parser.add_argument("--shard-gb", type=float, default=5.0, help="source shard size (.bin shards are built in memory)")
  parser.add_argument("--eager", action="store_true", help="also convert with the whole tree in memory")
  parser.add_argument("--work-dir", default=None,
                      help="folder that keeps the checkpoint for the next run (default: a temp dir, removed)")
  args = parser.parse_args()
  root = args.work_dir or tempfile.mkdtemp(prefix="convert_memory_")
  src = os.path.join(root, f"hf-{args.layers}-{args.format}")
  try:
    start = time.perf_counter()
    if os.path.exists(os.path.join(src, "config.json")):
      shapes = llama2_7b_shapes(args.layers)
    else:
      shapes = make_checkpoint(src, args.layers, args.format, int(args.shard_gb * 1e9))
      print(f"wrote the checkpoint in {time.perf_counter() - start:.0f}s")
    source_bytes = sum(2 * int(np.prod(s)) for s in shapes.values())
    largest_key = max(shapes, key=lambda k: np.prod(shapes[k]))
    largest = int(np.prod(shapes[largest_key])) * (4 if args.dtype == "float32" else 2)
    shards = len([n for n in os.listdir(src) if n.endswith(("safetensors", ".bin"))])
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    print(f"source: {args.layers} layers, {len(shapes)} tensors, {source_bytes / 1e9:.2f} GB bf16 in {shards} "
          f"{args.format} shards -> {args.dtype}; largest tensor {largest / 2**20:.1f} MiB ({largest_key})")
    print(f"{'way':>7} {'baseline MiB':>13} {'peak MiB':>9} {'growth MiB':>11} {'growth/largest':>15} "
          f"{'wall s':>7} {'GB/s':>6} {'output GB':>10}")
    results = {}
    for way in ["stream"] + (["eager"] if args.eager else []):
      out = os.path.join(root, f"out-{way}")
      r = convert(way, src, out, args.dtype)
      r["ratio"] = (r["peak_mib"] - r["baseline_mib"]) * 2**20 / largest
      results[way] = r
      print(f"{way:>7} {r['baseline_mib']:>13.0f} {r['peak_mib']:>9.0f} {r['peak_mib'] - r['baseline_mib']:>11.0f} "
            f"{r['ratio']:>15.2f} {r['wall_s']:>7.1f} {source_bytes / 1e9 / r['wall_s']:>6.2f} "
            f"{folder_bytes(out) / 1e9:>10.2f}")
      shutil.rmtree(out, ignore_errors=True)
    ok = results["stream"]["ratio"] <= BOUND
    print(f"stream: peak - baseline = {results['stream']['ratio']:.2f} x the largest tensor "
          f"({'within' if ok else 'OVER'} the {BOUND} x bound)")
    print(f"load average {os.getloadavg()[0]:.2f}")
    eager = results.get("eager")
    stream, eager = results["stream"], results.get("eager")
    print(json.dumps({"benchmark": "convert_memory/peak_growth", "ours": round(stream["ratio"], 3),
                      "reference": eager and round(eager["ratio"], 3), "unit": "x largest tensor",
                      "ratio": eager and round(eager["ratio"] / stream["ratio"], 2)}))
    print(json.dumps({"benchmark": "convert_memory/throughput", "ours": round(source_bytes / 1e9 / stream["wall_s"], 3),
                      "reference": eager and round(source_bytes / 1e9 / eager["wall_s"], 3), "unit": "GB/s",
                      "ratio": eager and round(eager["wall_s"] / stream["wall_s"], 2)}))
  finally:
    if not args.work_dir:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
