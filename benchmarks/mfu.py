"""Model FLOPs utilisation and tokens/s of real train steps on one accelerator (a GPU, where it says
the most): a ~1B-parameter LLaMA trained whole, and Video-LLaMA-7B's stage-2 step (frozen EVA ViT-g,
image Q-Former and LLaMA-7B; trained video Q-Former and projection), in bfloat16, each with XLA's
attention and with the fused kernel `attention_impl="auto"` picks (cuDNN on a GPU); the 1B LLaMA
also on 8,192-token rows, where attention is a larger share of the step. Each line reports the
compiled step's temporaries too.

    python benchmarks/mfu.py [--only llama_1b|llama_1b_8k|video_llama_7b] [--steps 10] [--json FILE] [--tiny]

The steps are the trainer's own (`Trainer.train_step`: AdamW, fp32 master weights of the trained
parameters, frozen ones stored in bf16), on random weights and a random batch of the recipe's shapes.
FLOPs per step are the matmul FLOPs of the step's jaxpr (`vllm_jax.train.flops`: a scanned layer
stack counted times its depth, rematerialised forward passes included), so
MFU = FLOPs per step / step time / peak, against the chip's dense bf16 datasheet peak and against
large bf16 matmuls measured on the same device first. A flash kernel's count includes the scores it
recomputes in its backward pass (what runs), so its MFU is not all useful work: compare step times.
Step times are medians of `--steps` steps after two warm-up steps; compile time is reported apart.
`--tiny` shrinks every model so that the script can be checked on a CPU: its numbers measure nothing.
"""

import argparse
import functools
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax import systems
from vllm_jax.configs import train_llama_tiny, video_llama
from vllm_jax.models.llama import Llama, LlamaConfig
from vllm_jax.nn import attention
from vllm_jax.train import run, sharding, trainer

# ~1.0B parameters: LLaMA-2's shape at 2048 wide, 16 layers (0.81B in the layers, 0.13B embeddings).
LLAMA_1B = LlamaConfig(hidden_size=2048, intermediate_size=5504, num_layers=16, num_heads=16, num_kv_heads=16,
                       head_dim=128, max_position_embeddings=4096)
LLAMA_TINY = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=4, head_dim=16, max_position_embeddings=512)


def matmul_peak(size: int, repeats: int = 20) -> float:
  """FLOP/s of [size, size] x [size, size] bf16 matmuls on the default device: `repeats` of them
  dispatched back to back and waited for once, so that no host round trip falls between them."""
  a, b = (jax.random.normal(jax.random.key(i), (size, size), jnp.bfloat16) for i in range(2))
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a, b).block_until_ready()
  best = math.inf
  for _ in range(3):
    start = time.perf_counter()
    outs = [matmul(a, b) for _ in range(repeats)]
    jax.block_until_ready(outs)
    best = min(best, (time.perf_counter() - start) / repeats)
  return 2 * size ** 3 / best


def check_fused_attention(tiny: bool) -> dict[str, float]:
  """The kernel `auto` picks here against XLA's on right-padded bf16 rows: relative error of the
  output and of the q, k, v gradients of a loss over the valid queries (fp32 XLA as the reference)."""
  batch, length, heads, head_dim = (2, 128, 4, 16) if tiny else (4, 2048, 16, 128)
  q, k, v = (jax.random.normal(jax.random.key(i), (batch, length, heads, head_dim), jnp.float32) for i in range(3))
  valid = jnp.arange(length)[None] < jnp.array([length, length // 3, length - 1, 7][:batch])[:, None]
  weights = jax.random.normal(jax.random.key(3), q.shape, jnp.float32)

  def loss(q, k, v, impl):
    y = attention.causal_attention(q, k, v, valid, jnp.arange(length), impl)
    return (y.astype(jnp.float32) * weights * valid[:, :, None, None]).sum(), y

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (_, ref), ref_grads = grad(q, k, v, "xla")
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  (_, out), grads = grad(*bf16, "auto")
  (_, out_xla), grads_xla = grad(*bf16, "xla")
  rel = lambda a, b: float(jnp.linalg.norm((a.astype(jnp.float32) - b) * mask(a)) / jnp.linalg.norm(b * mask(a)))
  mask = lambda a: valid[:, :, None, None] if a.ndim == 4 and a.shape == q.shape else 1.0
  return dict(kernel=attention.resolve_implementation("auto", bf16[0]),
              out=rel(out, ref), out_xla_bf16=rel(out_xla, ref),
              **{f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)},
              **{f"d{n}_xla_bf16": rel(g, r) for n, g, r in zip("qkv", grads_xla, ref_grads)})


def llama_1b(tiny: bool, attention_impl: str, batch: int = 8, length: int = 2048):
  """The whole LLaMA trains: [batch, length] tokens per step (tiny: [2, 128])."""
  cfg = train_llama_tiny.get_config("full")
  config = (LLAMA_TINY if tiny else LLAMA_1B).replace(dtype="bfloat16", attention_impl=attention_impl)
  cfg.model = config.to_dict()
  cfg.optim.frozen_dtype = "bfloat16"
  batch, length = (2, 128) if tiny else (batch, length)
  cfg.train.batch_size = batch
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model = Llama(config)
  params_fn = lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
  t = trainer.Trainer(cfg, mesh, trainer.causal_lm_loss(model), params_fn,
                      sharding.param_shardings(jax.eval_shape(params_fn, jax.random.key(0)), mesh))
  ids = np.random.default_rng(0).integers(3, config.vocab_size, (batch, length)).astype(np.int32)
  return t, dict(input_ids=ids, labels=ids, attention_mask=np.ones_like(ids)), batch * length


def video_llama_7b(tiny: bool, attention_impl: str):
  """The stage-2 recipe (tiny: its tiny model), 8 frames at 224 px and 512 text tokens per example."""
  cfg = video_llama.get_config("tiny_stage2" if tiny else "stage2")
  cfg.attention_impl = attention_impl
  cfg.compute_dtype = "bfloat16"
  cfg.train.batch_size = batch = 2 if tiny else 16
  cfg.optim.grad_accum = 1
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  system = systems.get(cfg.system)
  config = run.training_config(cfg, system, system.config_class.from_dict(cfg.model.to_dict()))
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  t = run.make_trainer(cfg, mesh, system, config)
  length = 128 if tiny else 512
  frames = config.num_frames
  size = config.vision.vit.image_size
  rng = np.random.default_rng(0)
  ids = rng.integers(3, config.llama.vocab_size, (batch, length)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, 1:1 + config.vision.video_qformer.num_queries] = config.video_token_id  # the video's tokens
  labels = ids.copy()
  labels[:, :1 + config.vision.video_qformer.num_queries] = trainer.IGNORE_INDEX
  data = dict(frames=rng.uniform(-1, 1, (batch, frames, size, size, 3)).astype(np.float32),
              frame_mask=np.ones((batch, frames), bool), input_ids=ids, labels=labels,
              attention_mask=np.ones_like(ids))
  return t, data, batch * length


def measure(name: str, build, tiny: bool, attention_impl: str, steps: int, peaks: dict[str, float]) -> dict:
  t, batch, tokens = build(tiny, attention_impl)
  state = t.init()
  batch = jax.device_put(batch, t.batch_sharding)
  start = time.perf_counter()
  state, metrics = t.train_step(state, batch)
  loss = float(metrics["loss"])
  compile_s = time.perf_counter() - start
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    state, metrics = t.train_step(state, batch)
    metrics["loss"].block_until_ready()
    if i >= 2:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  flops = t.flops_per_step * t.mesh.size
  memory = t.compiled_step.memory_analysis()
  out = dict(benchmark=name, attention=attention_impl, device=jax.devices()[0].device_kind, step_s=step_s,
             compile_s=compile_s, tokens_per_s=tokens / step_s, flops_per_step=flops, first_loss=loss,
             temp_bytes=memory.temp_size_in_bytes, argument_bytes=memory.argument_size_in_bytes,
             params=sum(math.prod(x.shape) for x in jax.tree.leaves((state.params, state.frozen))))
  for peak_name, peak in peaks.items():
    out[f"mfu_{peak_name}"] = flops / step_s / peak
  del state
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", choices=("llama_1b", "llama_1b_8k", "video_llama_7b"))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--attention", default="xla,auto", help="attention_impl values to compare")
  parser.add_argument("--json", help="also write the results to this file")
  parser.add_argument("--tiny", action="store_true", help="tiny models: check the script on a CPU")
  args = parser.parse_args()

  device = jax.devices()[0]
  peaks = {"measured": matmul_peak(512 if args.tiny else 8192)}
  datasheet = trainer.peak_flops(device)
  if datasheet:
    peaks["datasheet"] = datasheet
  print(f"device {device.device_kind} ({device.platform}); bf16 matmul {peaks['measured'] / 1e12:.0f} TFLOP/s"
        + (f", datasheet {datasheet / 1e12:.0f}" if datasheet else ""), flush=True)
  print("fused attention vs fp32 XLA (relative error; XLA in bf16 beside it):",
        json.dumps(check_fused_attention(args.tiny)), flush=True)
  builds = {"llama_1b": llama_1b, "llama_1b_8k": functools.partial(llama_1b, batch=2, length=8192),
            "video_llama_7b": video_llama_7b}
  results = []
  for name, build in builds.items():
    if args.only and name != args.only:
      continue
    for impl in args.attention.split(","):
      try:
        r = measure(name, build, args.tiny, impl, args.steps, peaks)
      except Exception as e:  # one failing case (a kernel the device lacks, memory) must not lose the others
        print(f"{name} with attention {impl} failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        continue
      results.append(r)
      print(json.dumps(r), flush=True)

  print(f"\n{'benchmark':<16} {'attention':<9} {'params':>7} {'step':>9} {'tokens/s':>10} {'TFLOPs/step':>11} "
        f"{'MFU (matmul)':>12} {'MFU (sheet)':>11} {'temp GiB':>8} {'compile':>8}")
  for r in results:
    sheet = f"{100 * r['mfu_datasheet']:10.1f}%" if "mfu_datasheet" in r else f"{'-':>11}"
    print(f"{r['benchmark']:<16} {r['attention']:<9} {r['params'] / 1e9:6.2f}B {1e3 * r['step_s']:7.1f}ms "
          f"{r['tokens_per_s']:10.0f} {r['flops_per_step'] / 1e12:11.1f} {100 * r['mfu_measured']:11.1f}% {sheet} "
          f"{r['temp_bytes'] / 2 ** 30:8.1f} {r['compile_s']:7.1f}s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(peaks=peaks, results=results), f, indent=1)


if __name__ == "__main__":
  main()
