"""`vllm-jax chat` about hour-long videos with a tiny random LLaMA-VID: peak memory against the
video's length, and the time an hour of video takes once compiled.

Each length (default 10 and 60 minutes; small frames at 1 fps) gets its own `vllm-jax chat`
process, answering one question with 8 new tokens; its peak RSS comes from wait4. Frames are
decoded and encoded in chunks and their features kept in a file, so the peak should not grow
with the length beyond the 2 tokens per frame (7,200 for an hour) and their KV cache.

  python benchmarks/long_video_chat.py [--minutes 10 60] [--size 64] [--keep DIR]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import av
import numpy as np


def write_video(path: str, seconds: int, size: int) -> None:
  """A 1 fps H.264 video whose square drifts across a changing background, written frame by frame."""
  with av.open(path, "w") as out:
    stream = out.add_stream("libx264", rate=1, options={"threads": "1"})
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for t in range(seconds):
      image = np.full((size, size, 3), (t * 7 % 256, 90, 160), np.uint8)
      x = t * 3 % (size - size // 4)
      image[size // 3:size // 3 + size // 4, x:x + size // 4] = (250, 40, 40)
      out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
    out.mux(stream.encode())


def make_model(out_dir: str, context: int) -> None:
  """A random tiny LLaMA-VID (28 px frames, so 2 tokens each) with real tokenizers."""
  import flax.linen as nn
  import jax

  from vllm_jax.configs import llama_vid as recipes
  from vllm_jax.data.tokenizer import train_tokenizer, train_wordpiece_tokenizer
  from vllm_jax.systems.llama_vid import LlamaVidSystem
  corpus = ["USER: What happens in the video? ASSISTANT: A red square moves right, again and again."] * 20
  tokenizer = train_tokenizer(corpus, os.path.join(out_dir, "tok"), vocab_size=300)
  instruction_tokenizer = train_wordpiece_tokenizer(corpus, os.path.join(out_dir, "bert"), vocab_size=100)
  cfg = recipes.get_config("tiny")
  cfg.model.llama.max_position_embeddings = context
  cfg.model.llama.vocab_size = len(tokenizer)
  config = LlamaVidSystem.prepare_init(cfg, tokenizer)
  inputs = {k: np.zeros(v.shape, v.dtype) for k, v in LlamaVidSystem.init_inputs(config).items()}
  params = nn.meta.unbox(LlamaVidSystem.model(config).init(jax.random.key(0), **inputs)["params"])
  LlamaVidSystem(config, params, tokenizer, instruction_tokenizer).save(os.path.join(out_dir, "model"))


def chat(model: str, video: str) -> tuple[float, float, str]:
  """One `vllm-jax chat` process -> (its peak RSS in MiB, wall seconds, its answer)."""
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vllm_jax.cli", "chat", "--model", model, "--video", video,
                             "--question", "What happens in the video?", "--max-new-tokens", "8"],
                            stdout=out, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak, not the benchmark's
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    if proc.returncode:
      raise SystemExit(f"chat failed:\n{err.read()}")
    return usage.ru_maxrss / 1024, wall, out.read().strip()


def warm_seconds(model: str, video: str) -> float:
  """One answer about `video` in this process, compiled beforehand: decoding, the ViT, the
  text-guided part, the prefill and 8 new tokens."""
  from vllm_jax import generate, systems
  system = systems.load(model)

  def answer():
    media = system.load_media(video)
    conv = system.conversation(media)
    conv.ask("What happens in the video?")
    ids = system.prompt_ids(conv.prompt(), media)
    embeds = system.embed([ids], system.encode_media([media]), [conv])
    generate.generate(system.config.llama, system.params["llm"], inputs_embeds=embeds, max_new_tokens=8)

  answer()
  start = time.perf_counter()
  answer()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--minutes", type=int, nargs="+", default=[10, 60])
  parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels")
  parser.add_argument("--keep", default=None, help="a folder to keep the model and videos in")
  args = parser.parse_args()
  root = args.keep or tempfile.mkdtemp(prefix="long_video_chat_")
  longest = max(args.minutes) * 60
  model = os.path.join(root, "model")
  if not os.path.exists(model):
    make_model(root, context=2 * longest + 1024)
  print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
  print(f"{'minutes':>8} {'frames':>7} {'peak RSS MiB':>13} {'wall s':>8}  answer")
  results = {}
  for minutes in args.minutes:
    video = os.path.join(root, f"{minutes}min.mp4")
    if not os.path.exists(video):
      write_video(video, minutes * 60, args.size)
    rss, wall, answer = chat(model, video)
    results[minutes] = (rss, wall)
    print(f"{minutes:>8} {minutes * 60:>7} {rss:>13.0f} {wall:>8.1f}  {answer[:40]!r}")
  if len(results) > 1:
    (m0, (r0, _)), (m1, (r1, _)) = min(results.items()), max(results.items())
    print(f"peak RSS grows {r1 - r0:+.0f} MiB from {m0} to {m1} minutes")
  longest_minutes = max(args.minutes)
  seconds = warm_seconds(model, os.path.join(root, f"{longest_minutes}min.mp4"))
  print(f"{seconds / longest_minutes * 60:.1f} s per hour of video once compiled ({longest_minutes} min: "
        f"{seconds:.1f} s for decoding, ViT, text-guided tokens, prefill and 8 new tokens)")
  print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
