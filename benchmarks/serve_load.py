"""`vllm-jax serve` under load: the slot engine (continuous batching) against static batching, over HTTP.

    python benchmarks/serve_load.py [--quick] [--users 32] [--requests 96] [--rate 2] [--slots 8]
                                    [--hidden 256] [--layers 4] [--context 512] [--max-len N] [--threads all|1]

One process serves a random LLaMA (a sentencepiece tokenizer trained on made-up words) with
`serve.Server`, engine "slots" then "static" (same slots, model and requests), and times four
workloads of streaming chat requests sent by threads of this process (urllib):
  closed  --users clients, each sending its next request when the last is answered (--requests)
  open    --requests Poisson arrivals at --rate per second
  video   --questions questions about --videos videos to a tiny random Video-LLaMA; each video must
          be encoded once (/metrics: vllm_jax_media_cache_misses_total)
  burst   --burst clients at once, max_tokens 8; HTTP errors and connection resets counted apart
Requests are greedy, max_tokens uniform in 8..256, prompts of 5..60 words (seeded). The stop token's
row of the LLaMA's output projection is zero, so every text answer runs to its max_tokens. Before
timing, the slot engine compiles every shape (--precompile), each server gets every prompt length,
the static one every (prompt, max_tokens) bucket, and the video one the same questions about other
videos; the compiles a timed workload still causes are counted. tokens/s: the sum of
usage.completion_tokens over the wall time; TTFT: the first chunk with content. The reference is
transformers' `generate` (same weights, torch on as many threads as XLA) on the first closed-loop
requests in static batches of --slots, without HTTP.

One run, --threads all by default: the server and its clients share the machine (--threads 1 pins
all of it to one core; see common.py). About 6 minutes on 2 idle cores, --quick about 4.
"""
import sys

from common import add_arguments, setup

if not any(a.startswith("--threads") for a in sys.argv[1:]) and not {"-h", "--help"} & set(sys.argv):
  sys.argv += ["--threads", "all"]  # one run, not one per mode: the clients share the server's cores
RUN = setup()

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import closing  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from long_video_chat import write_video  # noqa: E402
from transformers import LlamaConfig as HFLlamaConfig  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from vllm_jax import serve  # noqa: E402
from vllm_jax.configs.video_llama import model_config  # noqa: E402
from vllm_jax.converters import llama as llama_conv  # noqa: E402
from vllm_jax.data import conversation as conv_lib  # noqa: E402
from vllm_jax.data.tokenizer import train_tokenizer  # noqa: E402
from vllm_jax.systems.video_llama import VideoLlamaSystem  # noqa: E402

ROOMS = (16, 32, 64, 128, 256)  # the static engine's compiled max_tokens buckets (generate's `room`)


def words(rng: random.Random, count: int) -> list[str]:
  syllables = "ka lo mi ne ru ta ve so pi da gu fe li mo ba ze".split()
  return ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(count)]


def build_llama(args, tmp: str):
  """A random LLaMA -> (its `serve.Model`, the same as a transformers model, the words of its prompts)."""
  rng = random.Random(0)
  vocab = words(rng, 400)
  corpus = [conv_lib.VICUNA_V1.system] * 5
  corpus += [" ".join(rng.choices(vocab, k=40)) + " USER: ASSISTANT:" for _ in range(300)]
  tokenizer = train_tokenizer(corpus, os.path.join(tmp, "tokenizer"), vocab_size=args.vocab)
  torch.manual_seed(0)
  heads = args.hidden // 64
  hf = LlamaForCausalLM(HFLlamaConfig(
      vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
      max_position_embeddings=args.context, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
  with torch.no_grad():
    hf.lm_head.weight[tokenizer.eos_token_id] = 0  # its logit is 0, never the largest: no early stops
  hf.save_pretrained(os.path.join(tmp, "hf"))
  config, params = llama_conv.load_hf(os.path.join(tmp, "hf"), progress=False)
  return serve.Model("llama", tokenizer, config, jax.device_put(params)), hf, vocab


def build_video(args, tmp: str):
  """The tests' tiny random Video-LLaMA (vision only) -> (a new `serve.Model` of it, so a new media cache),
  the names of `--videos` warm-up videos and `--videos` timed ones under its media root)."""
  corpus = ["###Human: What is moving in the video?\n###Assistant: A red circle moves left and a blue square up.\n",
            "The video contains 4 frames sampled at 0.0, 1.5 seconds. USER: Hello ASSISTANT: Hi there."] * 20
  tokenizer = train_tokenizer(corpus, os.path.join(tmp, "video_tokenizer"), vocab_size=300)
  video_id, audio_id = VideoLlamaSystem.add_media_tokens(tokenizer)
  config = model_config("tiny").replace(audio=None, video_token_id=video_id, audio_token_id=audio_id)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.1).astype(a.dtype),
                        nn.meta.unbox(VideoLlamaSystem.abstract_params(config)))
  system = VideoLlamaSystem(config, params, tokenizer)
  media = os.path.join(tmp, "media")
  os.makedirs(media)
  names = [f"video{i}.mp4" for i in range(2 * args.videos)]
  for i, name in enumerate(names):
    write_video(os.path.join(media, name), seconds=8, size=32 + 8 * i)  # same prompt text, other pixels
  return lambda: serve.Model.from_system("video", system, media_policy=serve.MediaPolicy(media)), names


def chat(url: str, content, max_tokens: int) -> tuple[int, float | None, float, str | None]:
  """One streaming chat request -> (completion tokens, TTFT or None, latency, failure: None, "error" or "reset")."""
  body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
          "stream": True, "stream_options": {"include_usage": True}}
  request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
  start, first, tokens, failure = time.perf_counter(), None, 0, None
  try:
    with urllib.request.urlopen(request, timeout=900) as response:
      for line in response:
        if not line.startswith(b"data: {"):
          continue
        event = json.loads(line[6:])
        if "error" in event:
          failure = "error"
        elif event.get("usage"):
          tokens = event["usage"]["completion_tokens"]
        elif first is None and any(c["delta"].get("content") for c in event["choices"]):
          first = time.perf_counter() - start
  except urllib.error.HTTPError:
    failure = "error"
  except (ConnectionError, http.client.IncompleteRead):
    failure = "reset"
  except urllib.error.URLError as e:
    failure = "reset" if isinstance(e.reason, ConnectionError) else "error"
  except OSError:  # a timeout
    failure = "error"
  return tokens, first, time.perf_counter() - start, failure


def closed_loop(url: str, jobs: list, users: int) -> tuple[list, float]:
  """`users` clients, each taking the next job when answered -> (results, wall seconds)."""
  start = time.perf_counter()
  with ThreadPoolExecutor(users) as pool:
    results = list(pool.map(lambda job: chat(url, *job), jobs))
  return results, time.perf_counter() - start


def open_loop(url: str, jobs: list, rate: float, seed: int) -> tuple[list, float]:
  """Each job sent at its Poisson arrival time, whatever is still unanswered."""
  arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, len(jobs)))
  start = time.perf_counter()

  def at(i):
    time.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
    return chat(url, *jobs[i])

  with ThreadPoolExecutor(len(jobs)) as pool:
    results = list(pool.map(at, range(len(jobs))))
  return results, time.perf_counter() - start


def burst(url: str, jobs: list) -> tuple[list, float]:
  """Every job's client released at once."""
  gate = threading.Barrier(len(jobs))
  start = time.perf_counter()
  with ThreadPoolExecutor(len(jobs)) as pool:
    results = list(pool.map(lambda job: (gate.wait(), chat(url, *job))[1], jobs))
  return results, time.perf_counter() - start


class Compiles(logging.Handler):
  """Counts XLA compiles (jax_log_compiles, kept off the console): shapes a warm-up did not reach."""

  def __init__(self):
    super().__init__()
    self.count = 0
    for name in ("jax._src.interpreters.pxla", "jax._src.dispatch"):
      logging.getLogger(name).addHandler(self)
      logging.getLogger(name).propagate = False
    jax.config.update("jax_log_compiles", True)

  def emit(self, record):
    self.count += record.getMessage().startswith("Compiling ")


def timed(compiles: Compiles, workload, *args) -> dict:
  """Runs a workload -> its summary, with the compiles it caused."""
  before = compiles.count
  return {**summary(*workload(*args)), "compiles": compiles.count - before}


def summary(results: list, wall: float) -> dict:
  ok = [r for r in results if r[3] is None]
  pct = lambda values, q: float(np.percentile(values, q)) if len(values) else float("nan")
  ttft, latency = [r[1] for r in ok if r[1] is not None], [r[2] for r in ok]
  return {"requests": len(results), "tokens": sum(r[0] for r in ok), "wall": wall,
          "tokens_s": sum(r[0] for r in ok) / wall, "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99),
          "lat50": pct(latency, 50), "lat99": pct(latency, 99),
          "errors": sum(r[3] == "error" for r in results), "resets": sum(r[3] == "reset" for r in results)}


def misses(server) -> float:
  text = urllib.request.urlopen(server.url + "/metrics", timeout=60).read().decode()
  return float(re.search(r"^vllm_jax_media_cache_misses_total (\S+)$", text, re.M).group(1))


def warm_up(url: str, model: serve.Model, texts: list[str], engine: str, slots: int) -> None:
  """Every prompt length once (the static engine embeds each length apart), in reversed word order so
  that the slot engine's prefix cache gains nothing; for the static engine also every pair of prompt
  bucket (32 tokens) and max_tokens bucket, one at a time (a batch of one is padded to `slots` rows)."""
  by_length = {}
  for text in texts:
    by_length.setdefault(len(model.chat_prompt([{"role": "user", "content": text}], {}).ids), text)
  flipped = [" ".join(text.split()[::-1]) for text in by_length.values()]
  closed_loop(url, [(text, 2) for text in flipped], slots)
  if engine == "static":
    buckets = {-(-n // 32): text for n, text in zip(by_length, flipped)}
    closed_loop(url, [(text, room // 2 + 1) for text in buckets.values() for room in ROOMS], 1)


def reference_tokens_s(model: serve.Model, hf, jobs: list, slots: int) -> float:
  """transformers' `generate` on `jobs` in static batches of `slots` (each to its longest max_tokens,
  no early stops) -> answer tokens (each row's max_tokens) per second. A rate: 4 batches at most."""
  jobs = jobs[:4 * slots]
  ids = [model.chat_prompt([{"role": "user", "content": text}], {}).ids for text, _ in jobs]
  batches = [range(i, min(i + slots, len(jobs))) for i in range(0, len(jobs), slots)]

  def run(batch, limit=None):
    length = max(len(ids[i]) for i in batch)
    inputs = torch.tensor([[0] * (length - len(ids[i])) + ids[i] for i in batch])
    mask = torch.tensor([[0] * (length - len(ids[i])) + [1] * len(ids[i]) for i in batch])
    new = limit or max(jobs[i][1] for i in batch)
    hf.generate(inputs, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

  with torch.inference_mode():
    run(batches[0], limit=4)
    start = time.perf_counter()
    for batch in batches:
      run(batch)
    return sum(n for _, n in jobs) / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="fewer requests and clients")
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=1000, help="the tokenizer's vocabulary (a ceiling)")
  parser.add_argument("--context", type=int, default=512, help="the LLaMA's max_position_embeddings")
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--max-len", type=int, help="the server's --max-len (default: the server's)")
  parser.add_argument("--users", type=int, default=32, help="closed loop: concurrent clients")
  parser.add_argument("--requests", type=int, default=96, help="closed and open loop: requests each")
  parser.add_argument("--rate", type=float, default=2, help="open loop: mean arrivals per second")
  parser.add_argument("--videos", type=int, default=3)
  parser.add_argument("--questions", type=int, default=48)
  parser.add_argument("--burst", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  add_arguments(parser)
  args = parser.parse_args()
  if args.quick:
    args.requests, args.questions, args.burst = 16, 12, 128
  torch.set_num_threads(RUN.cores)
  load_before = os.getloadavg()
  started = time.perf_counter()

  with tempfile.TemporaryDirectory() as tmp:
    model, hf, vocab = build_llama(args, tmp)
    new_video_model, videos = build_video(args, tmp)
    rng = random.Random(args.seed)
    text = lambda: " ".join(rng.choices(vocab, k=rng.randint(5, 60)))
    closed_jobs = [(text(), rng.randint(8, 256)) for _ in range(args.requests)]
    open_jobs = [(text(), rng.randint(8, 256)) for _ in range(args.requests)]
    burst_jobs = [(text(), 8) for _ in range(args.burst)]
    questions = ["What is moving?", "What colour is the shape?", "Describe the video.", "How many objects?"]
    video_mix = [(i % args.videos, questions[i % 4], rng.randint(8, 256)) for i in range(args.questions)]
    video_jobs = lambda offset: [([{"type": "video_url", "video_url": {"url": videos[offset + v]}},
                                   {"type": "text", "text": q}], n) for v, q, n in video_mix]
    compiles = Compiles()
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {model.llama.vocab_size}, context "
          f"{args.context}, fp32; {args.slots} slots; torch threads {torch.get_num_threads()}; jax {jax.devices()}; "
          f"load average before {' '.join(f'{x:.2f}' for x in load_before)}", flush=True)

    rows = []
    for engine in ("slots", "static"):
      options = dict(port=0, engine=engine, slots=args.slots, max_len=args.max_len, queue_size=1024,
                     precompile=engine == "slots")
      loading = time.perf_counter()
      with closing(serve.Server(model, **options).start()) as server:
        if engine == "slots":
          print(f"slot engine: every shape compiled in {time.perf_counter() - loading:.0f} s (--precompile)",
                flush=True)
        warm_up(server.url, model, [j[0] for j in closed_jobs + open_jobs + burst_jobs], engine, args.slots)
        rows.append((f"closed {args.users} users", engine,
                     timed(compiles, closed_loop, server.url, closed_jobs, args.users)))
        rows.append((f"open {args.rate:g}/s", engine,
                     timed(compiles, open_loop, server.url, open_jobs, args.rate, args.seed)))
        rows.append((f"burst {args.burst}", engine, timed(compiles, burst, server.url, burst_jobs)))
      with closing(serve.Server(new_video_model(), **options).start()) as server:
        # Warm-up: the max_tokens buckets, then the same questions about the warm-up videos.
        closed_loop(server.url, [(job[0], room // 2 + 1) for room in ROOMS for job in video_jobs(0)[:4]], 1)
        closed_loop(server.url, video_jobs(0), args.users)
        before = misses(server)
        result = timed(compiles, closed_loop, server.url, video_jobs(args.videos), args.users)
        rows.append((f"video {args.questions}q/{args.videos}v", engine, {**result, "misses": misses(server) - before}))
      print(f"{engine} engine done at {time.perf_counter() - started:.0f} s", flush=True)
    reference = reference_tokens_s(model, hf, closed_jobs, args.slots)

  rows.sort(key=lambda row: ["closed", "open", "video", "burst"].index(row[0].split()[0]))
  print(f"\n{'workload':<17} {'engine':<7} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tokens/s':>8} "
        f"{'TTFT p50':>8} {'TTFT p99':>8} {'lat p50':>8} {'lat p99':>8} {'errors':>6} {'resets':>6} {'compiles':>8}")
  for workload, engine, r in rows:
    print(f"{workload:<17} {engine:<7} {r['requests']:>8} {r['tokens']:>7} {r['wall']:>7.1f} {r['tokens_s']:>8.0f} "
          f"{r['ttft50']:>8.2f} {r['ttft99']:>8.2f} {r['lat50']:>8.2f} {r['lat99']:>8.2f} {r['errors']:>6} "
          f"{r['resets']:>6} {r['compiles']:>8}")
  get = {(w.split()[0], e): r for w, e, r in rows}
  ratio = get["closed", "slots"]["tokens_s"] / get["closed", "static"]["tokens_s"]
  print(f"\nclosed loop, {args.users} users: slot/static tokens/s {ratio:.2f}x; transformers generate (static batches "
        f"of {args.slots}, no HTTP) {reference:.0f} tokens/s")
  print(f"video: media-cache misses during the run: slots {get['video', 'slots']['misses']:g}, static "
        f"{get['video', 'static']['misses']:g} (each video once: {args.videos})")
  if get["video", "slots"]["misses"] != args.videos:
    print("WARNING: the slot engine encoded a video more than once")
  print(f"load average before {' '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; total {time.perf_counter() - started:.0f} s")
  results = [{"benchmark": f"serve_{w.split()[0]}", "ours": round(get[w.split()[0], "slots"]["tokens_s"], 1),
              "reference": round(r["tokens_s"], 1)} for w, e, r in rows if e == "static"]
  results.append({"benchmark": "serve_closed_transformers", "ours": round(get["closed", "slots"]["tokens_s"], 1),
                  "reference": round(reference, 1)})
  RUN.report([{**r, "unit": "tokens/s", "ratio": round(r["ours"] / r["reference"], 2)} for r in results])


if __name__ == "__main__":
  main()
