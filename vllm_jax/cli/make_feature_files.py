"""`vllm-jax make-feature-files`: videos and their subtitles written as LLaMA-VID's long-video
feature files (`vllm_jax.data.long_video`), which `chat`, `infer` and stage-3 training read."""

import collections
import sys

from vllm_jax import paths
from vllm_jax.cli import flags

HELP = """Write each video as a long video's feature file, FOLDER/NAME.pkl, as LLaMA-VID's reference
extracts one: the video's frames at the model's rate (1 per second), each frame's ViT features
[T, 1+G*G, D] float16 (the model's EVA ViT), and its text, a "<image>" mark per frame with each
subtitle after the last frame shown before the subtitle ends. Subtitles come from NAME.srt beside
the video (or in --subtitles); a video without one gets marks only. `vllm-jax chat --video
FOLDER/NAME.pkl`, `infer`, and stage 3 of configs/llama_vid.py (data.video_features) read them.

A feature file already in FOLDER is kept and its video skipped, so a run that stopped goes on
where it was; each file is written whole, so a failure leaves none. A video that cannot be read
is named and the others go on; the command then exits with status 1. An hour of video takes
about 2.6 GB of features (5.2 GB of memory, and as much temporary disk, while it is written).
"""

EPILOG = """examples:
  vllm-jax make-feature-files --model ./models/llama-vid-7b-long movies/*.mp4 --out movie_features
  vllm-jax chat --model ./models/llama-vid-7b-long --video movie_features/tt0109830.pkl
"""


def add_parser(commands) -> None:
  parser = commands.add_parser("make-feature-files", help="write videos and their subtitles as LLaMA-VID's "
                               "long-video feature files (.pkl)", description=HELP, epilog=EPILOG,
                               formatter_class=flags.argparse.RawDescriptionHelpFormatter)
  parser.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (local or gs://)")
  parser.add_argument("--model", required=True, help="a LLaMA-VID model folder (its ViT makes the features)")
  parser.add_argument("--out", required=True, metavar="FOLDER", help="where NAME.pkl goes for each VIDEO")
  parser.add_argument("--subtitles", default=None, type=flags.existing_folder, metavar="FOLDER",
                      help="the folder of the NAME.srt files (default: each video's own)")
  flags.model_flags(parser)
  parser.set_defaults(run=run)


def run(args) -> int:
  from tqdm import tqdm

  from vllm_jax import pretrained
  from vllm_jax.data import long_video
  from vllm_jax.data.media import MediaError
  jobs = feature_files(args.videos, args.out, args.subtitles)
  kind = pretrained.model_type(args.model)
  if kind != "llama_vid":
    return flags.error(f"{args.model} holds a {kind} model: feature files hold a LLaMA-VID model's ViT features")
  todo = [(video, out, srt) for video, out, srt in jobs if not paths.exists(out)]
  print(f"{len(jobs) - len(todo)} of {len(jobs)} feature files already in {paths.shown(args.out)}; {len(todo)} "
        "to write", file=sys.stderr)
  if not todo:
    return 0
  system = flags.load_system(args)
  failed = []
  for video, out, srt in tqdm(todo, unit="video", file=sys.stderr):
    try:
      subtitles = long_video.read_srt(srt) if paths.is_file(srt) else []
      data = system.feature_file(video, subtitles)
    except (FileNotFoundError, MediaError, ValueError) as e:
      print(f"skipping {video}: {e}", file=sys.stderr)
      failed.append(video)
      continue
    paths.write_bytes(out, data)
  print(f"wrote {len(todo) - len(failed)} feature files in {paths.shown(args.out)}"
        + (f"; {len(failed)} videos could not be read: {', '.join(failed)}" if failed else ""), file=sys.stderr)
  return 1 if failed else 0


def feature_files(videos: list[str], out: str, subtitles: str | None) -> list[tuple[str, str, str]]:
  """[(video, its feature file, its .srt)], checked before the model loads: ValueError for a
  missing video, a video given as a feature file or twice under one name, or an --out that is a
  file; OSError for an --out that cannot be written."""
  from vllm_jax.data import long_video
  if paths.is_file(out):
    raise ValueError(f"--out {out} is a file: give a folder")
  paths.check_writable(paths.join(out, "x.pkl"))
  jobs = []
  for video in videos:
    if not paths.is_file(video):
      raise ValueError(f"no such video file: {video}")
    if long_video.is_feature_file(video):
      raise ValueError(f"{video} is a feature file already")
    name = paths.name(video).rsplit(".", 1)[0]
    jobs.append((video, paths.join(out, f"{name}.pkl"), paths.join(subtitles or paths.parent(video), f"{name}.srt")))
  twice = [name for name, n in collections.Counter(paths.name(o) for _, o, _ in jobs).items() if n > 1]
  if twice:
    raise ValueError(f"two videos would both be written as {twice[0]} in {out}: give them in separate runs")
  return jobs
