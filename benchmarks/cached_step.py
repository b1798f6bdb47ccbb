"""Video-LLaMA stage-1 train steps from a frozen-feature cache against the same steps from the videos:
steps/s of both, on the same model, data, seed and device, one process.

    python benchmarks/cached_step.py [--batch 2] [--frames 8] [--videos 16] [--steps 3] [--rounds 2] [--threads 1|all]

Model: the ViT-S-sized vision branch of benchmarks/train_step.py (ViT 384 x 12 at 112 px, BLIP-2's
12-layer Q-Former shape at 384 wide) and a 4-layer, 512-wide LLaMA, random init, fp32; captions of
synthetic mp4s (`vllm_jax.data.synthetic`), 32 caption tokens. The frozen ViT + image Q-Former are
most of an uncached step, as in the real model. `vllm-jax cache-features` (in-process) writes the
cache first; its time is reported apart, as is each step's compile.

Two measures, each side's best round (the sides take turns, so load from other processes hits both):
  step:       the train step alone, on one batch already in memory;
  with data:  next batch from the training pipeline (decoding videos, or reading the cache; in this
              process, data.worker_count 0) + the train step.
The headline has both sides on one core and thread (see common.py). Prints JSON lines
{"benchmark", "ours": cached, "reference": uncached, "unit", "ratio"}.
"""

from common import add_arguments, interleaved, setup

RUN = setup()

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from vllm_jax.cli.cache_features import cache_features  # noqa: E402
from vllm_jax.configs.video_llama import get_config  # noqa: E402
from vllm_jax.configs.video_llama_vision import branch_config  # noqa: E402
from vllm_jax.data import datasets, synthetic  # noqa: E402
from vllm_jax.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from vllm_jax.models.llama import LlamaConfig  # noqa: E402
from vllm_jax.models.video_llama import VideoLlamaConfig  # noqa: E402
from vllm_jax.systems.video_llama import VideoLlamaSystem  # noqa: E402
from vllm_jax.train import run as run_lib  # noqa: E402
from vllm_jax.train import sharding  # noqa: E402


def model_config(frames: int) -> VideoLlamaConfig:
  llama = LlamaConfig(vocab_size=320, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8,
                      num_kv_heads=8, head_dim=64, max_position_embeddings=256, remat_policy="none")
  vision = branch_config("mid")
  vision = vision.replace(vit=vision.vit.replace(image_size=112), llm_hidden_size=llama.hidden_size, max_frames=32)
  return VideoLlamaConfig(llama=llama, vision=vision, audio=None, num_frames=frames)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--videos", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=2)
  add_arguments(parser)
  args = parser.parse_args()

  tmp = tempfile.mkdtemp(prefix="cached_step_")
  paths = synthetic.make_dataset(os.path.join(tmp, "data"), num_train=args.videos, num_val=1, progress=False)
  captions = [row["name"] for row in synthetic.read_split(paths["train_csv"])]
  train_tokenizer(captions * 20, os.path.join(tmp, "tokenizer"), vocab_size=300)

  cfg = get_config("tiny_stage1")
  cfg.model = type(cfg)(model_config(args.frames).to_dict())
  cfg.data.update(tokenizer=os.path.join(tmp, "tokenizer"), webvid_csv=paths["train_csv"], webvid_dir=paths["videos"],
                  max_text_len=32)
  cfg.optim.frozen_dtype = "float32"
  cfg.train.batch_size = args.batch
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  config = VideoLlamaSystem.prepare_init(cfg, load_tokenizer(cfg.data.tokenizer))
  vit = config.vision.vit
  print(f"stage-1 step: ViT {vit.width} x {vit.depth} at {vit.image_size} px, Q-Former "
        f"{config.vision.qformer.hidden_size} x {config.vision.qformer.num_layers}, LLaMA "
        f"{config.llama.hidden_size} x {config.llama.num_layers}; batch {args.batch} x {args.frames} frames, "
        f"fp32; jax devices {jax.devices()}")

  start = time.perf_counter()
  cache_features(cfg, os.path.join(tmp, "cache"), batch_size=args.batch, progress=False)
  cache_s = time.perf_counter() - start
  cached_cfg = cfg.copy_and_resolve_references()
  cached_cfg.data.feature_cache = os.path.join(tmp, "cache")

  mesh = sharding.mesh_from_config(cfg.mesh)
  sides = {}
  for name, c in (("cached", cached_cfg), ("uncached", cfg)):
    trainer = run_lib.make_trainer(c, mesh, VideoLlamaSystem, config)
    it = iter(datasets.batches(VideoLlamaSystem.dataset(c, config, c.data.tokenizer), args.batch))
    local = {k: v for k, v in next(it).items() if k != "skipped"}
    batch = sharding.make_global_batch(local, mesh)
    start = time.perf_counter()
    state, metrics = trainer.train_step(trainer.init(), batch)
    first = float(metrics["loss"])
    sides[name] = dict(trainer=trainer, it=it, batch=batch, state=state, compile_s=time.perf_counter() - start,
                       first=first)
  print(f"cache written in {cache_s:.1f} s ({args.videos} videos); first-step loss cached "
        f"{sides['cached']['first']:.6f}, uncached {sides['uncached']['first']:.6f}")

  def run(side, with_data):
    s = sides[side]
    for _ in range(args.steps):
      batch = s["batch"]
      if with_data:
        batch = sharding.make_global_batch({k: v for k, v in next(s["it"]).items() if k != "skipped"}, mesh)
      s["state"], m = s["trainer"].train_step(s["state"], batch)
    jax.block_until_ready(m["loss"])

  results = {}
  for with_data in (False, True):
    times = interleaved(args.rounds, *(lambda side=side: run(side, with_data) for side in sides))
    results["with data" if with_data else "step"] = {side: t / args.steps for side, t in zip(sides, times)}

  print(f"\n{'measure':>10} {'cached ms':>10} {'uncached ms':>12} {'ratio':>6}")
  for measure, best in results.items():
    print(f"{measure:>10} {best['cached'] * 1e3:>10.1f} {best['uncached'] * 1e3:>12.1f} "
          f"{best['uncached'] / best['cached']:>6.2f}")
  print(f"compile s: cached {sides['cached']['compile_s']:.1f}, uncached {sides['uncached']['compile_s']:.1f}")
  RUN.report([{"benchmark": f"cached_step ({measure})", "ours": round(1 / best["cached"], 3),
               "reference": round(1 / best["uncached"], 3), "unit": "steps/s",
               "ratio": round(best["uncached"] / best["cached"], 2)} for measure, best in results.items()])
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
