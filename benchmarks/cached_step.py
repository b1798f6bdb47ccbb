"""Stage-1 train steps from a frozen-feature cache against the same steps from the media, for each
system: steps/s of both, on the same model, data, seed and device, one process.

    python benchmarks/cached_step.py [--system all|video_llama|video_llava|llama_vid] [--batch 2]
        [--frames 8] [--videos 16] [--steps 3] [--rounds 2] [--threads 1|all]

Models: ViT-S-sized encoders (384 wide, 12 blocks, at 112 px: 8 x 8 patches) and a 4-layer,
512-wide LLaMA, random init, fp32. Video-LLaMA: the vision branch of benchmarks/train_step.py (ViT,
then BLIP-2's 12-layer Q-Former shape at 384 wide, cached per frame); Video-LLaVA: image and video
towers of that ViT (the video tower's features of `--frames` frames cached, 65 tokens each);
LLaMA-VID: that ViT (cached per frame) and a 2-layer, 384-wide text-guided Q-Former with 32 queries,
which still runs on the cached features, frames at 2 per second (at most `--frames`). Data: the
captions and one-question conversations of synthetic mp4s (`vllm_jax.data.synthetic`). The frozen
encoders are most of an uncached step, as in the real models. `vllm-jax cache-features`
(in-process) writes each cache first; its time is reported apart, as is each step's compile.

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
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402

from vllm_jax import systems  # noqa: E402
from vllm_jax.cli.cache_features import cache_features  # noqa: E402
from vllm_jax.configs import llama_vid as llama_vid_recipes  # noqa: E402
from vllm_jax.configs import video_llama as video_llama_recipes  # noqa: E402
from vllm_jax.configs import video_llava as video_llava_recipes  # noqa: E402
from vllm_jax.configs.video_llama_vision import branch_config  # noqa: E402
from vllm_jax.data import conversation as conv_lib  # noqa: E402
from vllm_jax.data import datasets, synthetic  # noqa: E402
from vllm_jax.data.tokenizer import load_tokenizer, train_tokenizer, train_wordpiece_tokenizer  # noqa: E402
from vllm_jax.models.llama import LlamaConfig  # noqa: E402
from vllm_jax.models.llama_vid import LlamaVidConfig  # noqa: E402
from vllm_jax.models.qformer import QFormerConfig  # noqa: E402
from vllm_jax.models.video_llama import VideoLlamaConfig  # noqa: E402
from vllm_jax.models.video_llava import VideoLlavaConfig  # noqa: E402
from vllm_jax.models.vit import CLIP_VIT_L, EVA_VIT_G  # noqa: E402
from vllm_jax.train import run as run_lib  # noqa: E402
from vllm_jax.train import sharding  # noqa: E402

SYSTEMS = ("video_llama", "video_llava", "llama_vid")
LLAMA = LlamaConfig(vocab_size=320, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8,
                    num_kv_heads=8, head_dim=64, max_position_embeddings=1024, remat_policy="none")
VIT = dict(image_size=112, patch_size=14, width=384, depth=12, num_heads=6, mlp_dim=1536)


def model_config(system: str, frames: int):
  if system == "video_llama":
    vision = branch_config("mid")
    vision = vision.replace(vit=vision.vit.replace(image_size=112), llm_hidden_size=LLAMA.hidden_size, max_frames=32)
    return VideoLlamaConfig(llama=LLAMA.replace(max_position_embeddings=256), vision=vision, audio=None,
                            num_frames=frames)
  if system == "video_llava":
    tower = CLIP_VIT_L.replace(**VIT)
    return VideoLlavaConfig(llama=LLAMA, image_tower=tower, video_tower=tower, num_frames=frames)
  qformer = QFormerConfig(hidden_size=384, num_layers=2, num_heads=6, intermediate_size=1536, encoder_width=384,
                          num_queries=32, vocab_size=512, max_position_embeddings=64)
  return LlamaVidConfig(llama=LLAMA, vit=EVA_VIT_G.replace(**VIT), qformer=qformer, fps=2.0, max_instruction_len=32)


def train_config(system: str, args, tmp: str, data: dict) -> ml_collections.ConfigDict:
  """The system's tiny stage-1 recipe with the benchmark's model and data."""
  recipes = {"video_llama": video_llama_recipes, "video_llava": video_llava_recipes, "llama_vid": llama_vid_recipes}
  cfg = recipes[system].get_config("tiny_stage1")
  cfg.model = ml_collections.ConfigDict(model_config(system, args.frames).to_dict())
  cfg.data.tokenizer = os.path.join(tmp, "tokenizer")
  if system == "video_llama":
    cfg.data.update(webvid_csv=data["train_csv"], webvid_dir=data["videos"], max_text_len=32)
  else:
    cfg.data.update(instruct_json=data["captions_json"], instruct_dir=data["videos"], max_text_len=192,
                    max_len=192 + args.frames * 65)
  if system == "llama_vid":  # captions without a system prompt; two tokens a frame
    cfg.data.update(instruction_tokenizer=os.path.join(tmp, "bert"), max_frames=args.frames, max_text_len=64,
                    max_len=64 + args.frames * 2)
  cfg.optim.frozen_dtype = "float32"
  cfg.train.batch_size = args.batch
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  return cfg


def make_data(args, tmp: str) -> dict:
  """Synthetic mp4s, their captions (CSV) and one-question conversations about them (LLaVA JSON); tokenizers."""
  data = synthetic.make_dataset(os.path.join(tmp, "data"), num_train=args.videos, num_val=1, progress=False)
  with open(data["train_json"]) as f:
    conversations = json.load(f)
  for c in conversations:
    c["conversations"] = c["conversations"][:2]
  data["captions_json"] = os.path.join(tmp, "captions.json")
  with open(data["captions_json"], "w") as f:
    json.dump(conversations, f)
  texts = [row["name"] for row in synthetic.read_split(data["train_csv"])]
  texts += [m["value"] for c in conversations for m in c["conversations"]]
  texts += [conv_lib.get_template(name).system for name in ("llava_v1", "vicuna_v1")]
  train_tokenizer(texts * 20, os.path.join(tmp, "tokenizer"), vocab_size=300)
  train_wordpiece_tokenizer(texts * 20, os.path.join(tmp, "bert"), vocab_size=200)
  return data


def measure(name: str, args, tmp: str, data: dict) -> dict:
  """-> {measure: {side: seconds per step}}, printed as a table."""
  system = systems.get(name)
  cfg = train_config(name, args, tmp, data)
  config = run_lib.training_config(cfg, system, system.prepare_init(cfg, load_tokenizer(cfg.data.tokenizer)))
  start = time.perf_counter()
  cache_features(cfg, os.path.join(tmp, f"cache_{name}"), batch_size=args.batch, progress=False)
  cache_s = time.perf_counter() - start
  cached_cfg = cfg.copy_and_resolve_references()
  cached_cfg.data.feature_cache = os.path.join(tmp, f"cache_{name}")

  mesh = sharding.mesh_from_config(cfg.mesh)
  sides = {}
  for side, c in (("cached", cached_cfg), ("uncached", cfg)):
    trainer = run_lib.make_trainer(c, mesh, system, config)
    ds = system.dataset(c, config, c.data.tokenizer)
    ds = ds[0][0] if isinstance(ds, list) else ds  # grouped by media kind: the one group, videos
    it = iter(datasets.batches(ds, args.batch))
    batch = sharding.make_global_batch({k: v for k, v in next(it).items() if k != "skipped"}, mesh)
    start = time.perf_counter()
    state, metrics = trainer.train_step(trainer.init(), batch)
    first = float(metrics["loss"])
    sides[side] = dict(trainer=trainer, it=it, batch=batch, state=state, compile_s=time.perf_counter() - start,
                       first=first)
  print(f"\n{name}: cache written in {cache_s:.1f} s ({args.videos} videos); first-step loss cached "
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
  print(f"{'measure':>10} {'cached ms':>10} {'uncached ms':>12} {'ratio':>6}")
  for measure_name, best in results.items():
    print(f"{measure_name:>10} {best['cached'] * 1e3:>10.1f} {best['uncached'] * 1e3:>12.1f} "
          f"{best['uncached'] / best['cached']:>6.2f}")
  print(f"compile s: cached {sides['cached']['compile_s']:.1f}, uncached {sides['uncached']['compile_s']:.1f}")
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--system", choices=("all",) + SYSTEMS, default="all")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--videos", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=2)
  add_arguments(parser)
  args = parser.parse_args()

  tmp = tempfile.mkdtemp(prefix="cached_step_")
  data = make_data(args, tmp)
  print(f"stage-1 steps: ViT {VIT['width']} x {VIT['depth']} at {VIT['image_size']} px, LLaMA {LLAMA.hidden_size} x "
        f"{LLAMA.num_layers}; batch {args.batch} videos x {args.frames} frames, fp32; jax devices {jax.devices()}")
  lines = []
  for name in SYSTEMS if args.system == "all" else (args.system,):
    for measure_name, best in measure(name, args, tmp, data).items():
      lines.append({"benchmark": f"cached_step {name} ({measure_name})", "ours": round(1 / best["cached"], 3),
                    "reference": round(1 / best["uncached"], 3), "unit": "steps/s",
                    "ratio": round(best["uncached"] / best["cached"], 2)})
  RUN.report(lines)
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
