"""Training input pipeline: videos decoded and preprocessed per second per CPU core, each system's
training-frame path against the references' way (decord `get_batch` + torch tensor transforms in a
PyTorch DataLoader), and the cores a host needs to keep a 7B recipe's train step fed.

    python benchmarks/input_pipeline.py [--videos 4] [--big-videos 2] [--seconds 10] [--rounds 2]
                                        [--workers 2] [--batches 3] [--worker-rounds 1] [--threads 1|all]
                                        [--systems video_llama video_llava llama_vid]

Videos: WebVid-like H.264 mp4s written with PyAV (libx264 preset veryfast, x264's default GOP of 250
frames, B-frames, 30 fps, `--seconds` long): a noisy texture panning across the frame, so that every
frame differs and the encoder does real work (~0.4 Mbit/s at 336x596, ~4 Mbit/s at 1080p).
`--videos` at 336x596 (WebVid's size) and `--big-videos` at 1920x1080, kept in the temp folder for
later runs.

Each side's frames per video, as training makes them (ours reads H.264 mp4s with
`video.H264Reader`: the frames decord gives, bit for bit, decoding fewer pictures):
  Video-LLaMA  ours: `video_llama.Decode.load` (8 frames "headtail", decoded at 224x224, one
               RandomResizedCrop (scale 0.5-1, bicubic) for all frames, EVA/CLIP normalisation);
               reference: decord VideoReader(width=224, height=224).get_batch, RandomResizedCrop
               (bicubic), /255, Normalize on the [T, C, H, W] float tensor.
  Video-LLaVA  ours: `load_media(..., **video_llava.PREPROCESS)` (8 frames linspace, native size,
               short side to 224 bilinear, centre crop); reference: decord at native size, /255,
               Normalize, Resize(224, bilinear, no antialias), CenterCrop(224).
  LLaMA-VID    ours: `llama_vid.Decode.frames` (1 frame a second, CLIPImageProcessor's resize and
               crop per frame, padded to the stage-1 max_frames, 64; uint8, as training's examples
               carry them: the step normalises on the device); reference: decord get_batch at
               1 fps + transformers' CLIPImageProcessor (float32, normalised).
The references' video transforms are torchvision's (or their own thin wrappers of
torch.nn.functional.interpolate); torchvision is not a dependency of vllm_jax. On PyPI its Linux
wheels are CUDA builds that need a CUDA torch, so install the CPU build by hand:
    pip install --no-deps torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu
Without a working torchvision the script says so and runs the same torch.nn.functional calls that
torchvision's tensor kernels make (slicing, interpolate, (x - mean) / std).

Rates are videos per CPU second (`time.process_time`, or the CPU time of the process and its
workers), not per wall second: on a shared host other people's jobs then slow neither side's figure.
--threads 1 (the headline): one process on one core, the sides taking turns over the same videos,
  best of --rounds: videos per CPU second = videos/s one core gives.
--threads all: --workers worker processes a side, grain `mp_prefetch` through
  `datasets.batches(worker_count=N)` against `torch.utils.data.DataLoader(num_workers=N)`, batches
  of 8 WebVid-size videos: a run of 1 + --batches batches less a run of one batch (so that worker
  start-up and read-ahead cancel out), in videos per CPU second of all the processes (the
  pipeline's overhead included: the main process, shared memory, start-up left out) and videos/s.
Then, from the one-core rates at 336x596, the cores a recipe needs: videos per step / step time /
(videos/s per core). Prints tables and JSON lines: ratio > 1 means ours is faster.
"""

from common import add_arguments, interleaved, setup

# Worker processes import this module (as __mp_main__) for its decode classes; only the script pins.
RUN = setup() if __name__ == "__main__" else None

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import av  # noqa: E402
import numpy as np  # noqa: E402

from vllm_jax.data import datasets  # noqa: E402
from vllm_jax.data import video as video_lib  # noqa: E402
from vllm_jax.data.media import load_media  # noqa: E402
from vllm_jax.systems import llama_vid, video_llama, video_llava  # noqa: E402

SYSTEMS = ("video_llama", "video_llava", "llama_vid")
SIZES = {"336x596": (336, 596), "1080p": (1080, 1920)}
BATCH = 8  # videos per batch in the worker pipelines
# The 7B recipes' compute-bound step on v5e:2x4 (8 chips; FLOPs / bf16 peak), measured with
# `vllm-jax plan --config configs/<file> --topology v5e:2x4`: (file, videos per step = the global
# batch (a stage-1 batch holds one media kind: a video batch is all videos), seconds per step).
RECIPES = {"video_llama": ("video_llama.py:stage1", 256, 0.975),  # 1.536e15 FLOPs; 8 frames, 65 tokens
           "video_llava": ("video_llava.py:stage1", 256, 22.9),   # 3.61e16; 3,072 tokens (does not fit 16 GiB)
           "llama_vid": ("llama_vid.py:stage1", 256, 8.4)}        # 1.324e16; 64 frames, 384 tokens
# Host CPUs: a TPU v5litepod-8 host (ct5lp-hightpu-8t) has 224 vCPUs; an 8x H100 node (a3-highgpu-8g)
# 208. A vCPU is a hyperthread, counted here as a core (optimistic: two share a core's decoder units).
HOSTS = {"a v5e-8 host": 224, "an 8x H100 node": 208}

VIDEO_LLAMA = video_llama.Decode(tokenizer_dir="", stage=1, seq_len=0, max_text_len=0, num_frames=8, image_size=224,
                                 num_video_tokens=32, num_audio_tokens=0, audio=None)
LLAMA_VID = llama_vid.Decode(tokenizer_dir="", instruction_tokenizer_dir="", text_format="caption", max_text_len=0,
                             max_len=0, max_frames=64, max_turns=1, max_instruction_len=0, image_size=224, fps=1.0,
                             image_token_id=0, tokens_per_frame=2)
CLIP_MEAN, CLIP_STD = video_lib.CLIP_MEAN.tolist(), video_lib.CLIP_STD.tolist()


def write_video(path: str, height: int, width: int, seconds: float, fps: int = 30, seed: int = 0) -> None:
  """A WebVid-like mp4 (see the module doc): a texture (8-pixel blocks plus noise) panning right and
  down, written to a temporary name first so that a stopped run leaves no half file."""
  rng = np.random.default_rng(seed)
  frames = int(seconds * fps)
  tex_h, tex_w = height + frames // 2 + 1, width + frames + 1
  blocks = np.repeat(np.repeat(rng.integers(0, 256, (tex_h // 8 + 1, tex_w // 8 + 1, 3), np.uint8), 8, 0), 8, 1)
  texture = blocks[:tex_h, :tex_w] // 2 + rng.integers(0, 64, (tex_h, tex_w, 3), np.uint8) + 32
  partial = path + ".part"
  with av.open(partial, "w", format="mp4") as out:
    stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "threads": "1"})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(frames):
      image = np.ascontiguousarray(texture[i // 2:i // 2 + height, i:i + width])
      out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
    out.mux(stream.encode())
  os.replace(partial, path)


def videos(size: str, count: int, seconds: float) -> list[str]:
  """`count` videos of `size`, written on first use into the temp folder."""
  folder = os.path.join(tempfile.gettempdir(), "vllm_jax_input_pipeline")
  os.makedirs(folder, exist_ok=True)
  paths = []
  for seed in range(count):
    path = os.path.join(folder, f"{size}_{seconds:g}s_{seed}.mp4")
    if not os.path.exists(path):
      write_video(path, *SIZES[size], seconds, seed=seed)
    paths.append(path)
  return paths


# --- ours: the systems' training-frame paths -----------------------------------------------------

def ours(system: str, path: str) -> np.ndarray:
  """A video's training frames [T, 224, 224, 3], as `system`'s dataset decodes them (float32;
  LLaMA-VID's uint8)."""
  record = dict(media=path, kind="video")
  if system == "video_llama":
    return VIDEO_LLAMA.load(record).frames.frames
  if system == "video_llava":
    return load_media(path, 8, 224, **video_llava.PREPROCESS).frames.frames
  return LLAMA_VID.frames(record)[0]


# --- reference: decord + torch tensor transforms ------------------------------------------------

@functools.lru_cache(maxsize=None)
def torchvision_functional():
  """torchvision's tensor transforms (v2.functional), or None where it cannot be imported (tried once)."""
  try:
    from torchvision.transforms.v2 import functional
  except Exception:  # pylint: disable=broad-except  (absent, or a build whose ops do not load)
    return None
  return functional


def resized_crop(video, size: int):
  """RandomResizedCrop(size, scale=(0.5, 1), bicubic) on [T, C, H, W] float: one box for all frames."""
  import torch
  height, width = video.shape[-2:]
  top, left, h, w = crop_box(height, width)
  tv = torchvision_functional()
  if tv is not None:
    return tv.resized_crop(video, top, left, h, w, [size, size], interpolation=tv.InterpolationMode.BICUBIC,
                           antialias=False)
  return torch.nn.functional.interpolate(video[..., top:top + h, left:left + w], size=(size, size), mode="bicubic",
                                         align_corners=False)


def crop_box(height: int, width: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params, drawn with torch's generator."""
  import torch
  area = height * width
  log_ratio = torch.log(torch.tensor(ratio))
  for _ in range(10):
    target = area * torch.empty(1).uniform_(*scale).item()
    aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return (torch.randint(0, height - h + 1, (1,)).item(), torch.randint(0, width - w + 1, (1,)).item(), h, w)
  return 0, 0, height, width


def short_side_crop(video, size: int):
  """Resize(size: the short side, bilinear, no antialias) then CenterCrop(size) on [T, C, H, W] float."""
  import torch
  tv = torchvision_functional()
  if tv is not None:
    video = tv.resize(video, size, interpolation=tv.InterpolationMode.BILINEAR, antialias=False)
    return tv.center_crop(video, [size, size])
  height, width = video.shape[-2:]
  out = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
  video = torch.nn.functional.interpolate(video, size=out, mode="bilinear", align_corners=False)
  top, left = round((out[0] - size) / 2), round((out[1] - size) / 2)
  return video[..., top:top + size, left:left + size]


def normalize(video):
  """(x - mean) / std per channel of [T, C, H, W] float."""
  import torch
  tv = torchvision_functional()
  if tv is not None:
    return tv.normalize(video, CLIP_MEAN, CLIP_STD)
  return (video - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


@dataclasses.dataclass
class ClipProcessor:
  """transformers' CLIPImageProcessor (224: short side bicubic, centre crop), made once a process."""
  processor: object = None

  def __call__(self, frames: np.ndarray):
    if self.processor is None:
      import transformers
      self.processor = transformers.CLIPImageProcessor(size={"shortest_edge": 224},
                                                       crop_size={"height": 224, "width": 224})
    return self.processor.preprocess(list(frames), return_tensors="pt")["pixel_values"]


CLIP_PROCESSOR = ClipProcessor()


def reference(system: str, path: str):
  """A video's training frames the references' way: [T, 3, 224, 224] float32 torch tensor."""
  import decord
  import torch
  if system == "video_llama":
    reader = decord.VideoReader(path, width=224, height=224)
    indices = video_lib.sample_indices(len(reader), 8, "headtail")
    video = torch.from_numpy(reader.get_batch(list(indices)).asnumpy()).permute(0, 3, 1, 2).float()
    return normalize(resized_crop(video, 224) / 255)
  reader = decord.VideoReader(path)
  if system == "video_llava":
    indices = np.linspace(0, len(reader) - 1, 8, dtype=int)
    video = torch.from_numpy(reader.get_batch(list(indices)).asnumpy()).permute(0, 3, 1, 2).float()
    return short_side_crop(normalize(video / 255), 224)
  step = max(1, round(reader.get_avg_fps() / LLAMA_VID.fps))
  return CLIP_PROCESSOR(reader.get_batch(list(range(0, len(reader), step))).asnumpy())


# --- the worker pipelines ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OursDecode:
  """record -> {"frames"}, for grain's worker processes."""
  system: str

  def __call__(self, record):
    return {"frames": ours(self.system, record["media"])}


class ReferenceDataset:
  """A map-style dataset for torch's DataLoader: record i -> the reference's frames."""

  def __init__(self, system: str, paths: list[str]):
    self.system, self.paths = system, paths

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    return reference(self.system, self.paths[i])


def pipeline_cost(make_batches, batches: int) -> tuple[float, float]:
  """(seconds, CPU seconds of this process and its workers) of a whole pipeline run over `batches`
  batches: workers started, every batch read, workers shut down and reaped."""
  import gc
  import resource
  cpu = lambda: sum(t for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                    for t in resource.getrusage(who)[:2])
  start, start_cpu = time.perf_counter(), cpu()
  iterator = make_batches(batches)
  for _ in range(batches):
    next(iterator)
  if hasattr(iterator, "close"):
    iterator.close()
  del iterator
  gc.collect()
  return time.perf_counter() - start, cpu() - start_cpu


def pipeline_rate(make_batches, short: int, long: int) -> tuple[float, float]:
  """Videos per second and per CPU second of a pipeline: the extra cost of `long` batches over
  `short` ones, so that worker start-up and the batches read ahead cancel out."""
  (wall_0, cpu_0), (wall_1, cpu_1) = pipeline_cost(make_batches, short), pipeline_cost(make_batches, long)
  videos = (long - short) * BATCH
  return videos / (wall_1 - wall_0), videos / (cpu_1 - cpu_0)


def ours_pipeline(system: str, paths: list[str], workers: int):
  """batches -> an iterator over that many batches of grain's worker pipeline."""
  def make(batches):
    records = [dict(media=paths[i % len(paths)], kind="video") for i in range(batches * BATCH)]
    ds = datasets.examples(records, OursDecode(system), seed=0, shuffle=False, num_epochs=1)
    return iter(datasets.batches(ds, BATCH, worker_count=workers, process_index=0, process_count=1))
  return make


def reference_pipeline(system: str, paths: list[str], workers: int):
  """batches -> an iterator over that many batches of torch's DataLoader."""
  import torch

  def make(batches):
    records = [paths[i % len(paths)] for i in range(batches * BATCH)]
    return iter(torch.utils.data.DataLoader(ReferenceDataset(system, records), batch_size=BATCH,
                                            num_workers=workers, drop_last=True))
  return make


# --- the run -------------------------------------------------------------------------------------

def per_core(args) -> list[dict]:
  """Both sides over the same videos, in turn, on this process's one core."""
  results = []
  for size, count in (("336x596", args.videos), ("1080p", args.big_videos)):
    if not count:
      continue
    paths = videos(size, count, args.seconds)
    for system in args.systems:
      mine, theirs = interleaved(args.rounds, lambda: [ours(system, p) for p in paths],
                                 lambda: [reference(system, p) for p in paths], clock=time.process_time)
      results.append({"benchmark": f"input_pipeline_{system}_{size}", "ours": round(len(paths) / mine, 2),
                      "reference": round(len(paths) / theirs, 2), "unit": "videos/s per core",
                      "ratio": round(theirs / mine, 2)})
  print(f"\n{'system':<12} {'video':<8} {'ours':>7} {'ref':>7} {'ratio':>6}   (videos/s on one core)")
  for r in results:
    _, _, rest = r["benchmark"].partition("input_pipeline_")
    system, size = rest.rsplit("_", 1)
    print(f"{system:<12} {size:<8} {r['ours']:>7.2f} {r['reference']:>7.2f} {r['ratio']:>6.2f}")
  print("\ncores to keep a 7B stage-1 step fed (videos per step / step time / videos/s per core):")
  rates = {(r["benchmark"], side): r[side] for r in results for side in ("ours", "reference")}
  for system in args.systems:
    recipe, batch, step_s = RECIPES[system]
    need = {key: math.ceil(batch / step_s / rate) for key, rate in rates.items()
            if key[0].startswith(f"input_pipeline_{system}_")}
    sizes = "; ".join(f"{size}: {need[(f'input_pipeline_{system}_{size}', 'ours')]} core(s) (reference way "
                      f"{need[(f'input_pipeline_{system}_{size}', 'reference')]})"
                      for size in SIZES if (f"input_pipeline_{system}_{size}", "ours") in need)
    hosts = ", ".join(f"{name} has {cores}" for name, cores in HOSTS.items())
    print(f"  {recipe} ({batch} videos in {step_s} s) needs, {sizes}; {hosts}")
  return results


def with_workers(args) -> list[dict]:
  """Each side's worker pipeline over WebVid-size videos, best of --worker-rounds."""
  paths = videos("336x596", args.videos, args.seconds)
  results = []
  for system in args.systems:
    best = [(0.0, 0.0), (0.0, 0.0)]  # (videos/s, videos per CPU s) of each side
    for _ in range(args.worker_rounds):
      for i, side in enumerate((ours_pipeline, reference_pipeline)):
        rate = pipeline_rate(side(system, paths, args.workers), 1, 1 + args.batches)
        best[i] = tuple(map(max, best[i], rate))
    (wall, cpu), (ref_wall, ref_cpu) = best
    results.append({"benchmark": f"input_pipeline_{system}_workers", "ours": round(cpu, 2),
                    "reference": round(ref_cpu, 2),
                    "unit": f"videos per CPU s, {args.workers} workers", "ratio": round(cpu / ref_cpu, 2),
                    "ours_per_s": round(wall, 2), "reference_per_s": round(ref_wall, 2)})
  print(f"\n{'system':<12} {'ours':>7} {'ref':>7} {'ratio':>6} {'ours/s':>7} {'ref/s':>7}   (videos per CPU "
        f"second of all processes, then videos/s; {args.workers} workers, 336x596)")
  for r in results:
    print(f"{r['benchmark'][15:-8]:<12} {r['ours']:>7.2f} {r['reference']:>7.2f} {r['ratio']:>6.2f} "
          f"{r['ours_per_s']:>7.2f} {r['reference_per_s']:>7.2f}")
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--videos", type=int, default=4, help="videos at 336x596")
  parser.add_argument("--big-videos", type=int, default=2, help="videos at 1920x1080")
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--workers", type=int, default=2, help="worker processes a side (--threads all)")
  parser.add_argument("--batches", type=int, default=6, help="batches of 8 a worker pipeline runs beyond a "
                      "one-batch run, whose cost it takes off")
  parser.add_argument("--worker-rounds", type=int, default=1, help="fresh worker pipelines a side (--threads all)")
  parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
  add_arguments(parser)
  args = parser.parse_args()
  import torch
  tv = torchvision_functional()
  print(f"decord + torch {torch.__version__} (threads {torch.get_num_threads()}); torchvision: "
        + ("imported" if tv is not None else "NOT importable: the reference transforms run as the "
           "torch.nn.functional calls torchvision's tensor kernels make; for torchvision itself: pip install "
           "--no-deps torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu"), flush=True)
  RUN.report(per_core(args) if RUN.threads == "1" else with_workers(args))


if __name__ == "__main__":
  main()
