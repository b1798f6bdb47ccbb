"""A synthetic audio-visual caption dataset: a coloured shape moves across the frame while a sound
plays, so a caption model must use the frames' order (which way it moves) and the audio track
(which sound) as well as single frames (colour, shape).

Each video is a real mp4 (H.264 frames + AAC audio, written with PyAV), e.g. "a red circle moves
left with a low tone". Layout:
  {out}/{split}.csv                    WebVid-style captions (`datasets.webvid_records`):
                                       videoid,contentUrl,duration,page_dir,name,colour,shape,direction,sound
  {out}/{split}.json                   LLaVA-style conversations (`datasets.llava_records`, media relative
                                       to {out}/videos): a question answered by the caption, then one
                                       question per attribute, in random order ("Which way does it move?"
                                       "left")
  {out}/videos/{split}/{videoid}.mp4   page_dir = split
Splits draw from different seeds; every attribute combination appears equally often (up to
rounding). The same arguments always give the same files.
"""

import csv
import dataclasses
import fractions
import io
import itertools
import json
import re

import numpy as np

from vllm_jax import paths
from vllm_jax.data.video import sample_indices

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down
SOUNDS = {"low tone": 220.0, "high tone": 1760.0, "noise": 0.0}                 # Hz; 0 = white noise
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "direction": tuple(DIRECTIONS), "sound": tuple(SOUNDS)}
QUESTIONS = ("Describe the video.", "What happens in the video?", "What do you see and hear?")
FOLLOW_UPS = {"colour": "What colour is the shape?", "shape": "What shape is it?",
              "direction": "Which way does it move?", "sound": "What does it sound like?"}
GENERATOR_VERSION = 3  # bumped whenever the same arguments would draw different videos
FIELDS = ("videoid", "contentUrl", "duration", "page_dir", "name", *ATTRIBUTES)


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  size: int = 64            # pixels, square
  fps: int = 8
  seconds: float = 3.0
  sample_rate: int = 16000
  background: int = 24      # grey level
  sampled_frames: int = 8   # frames a model samples (uniformly) from each video; see `render_frames`


def caption(colour: str, shape: str, direction: str, sound: str) -> str:
  return f"a {colour} {shape} moves {direction} with {'noise' if sound == 'noise' else 'a ' + sound}"


def conversation(question: str, attributes: dict[str, str], rng: np.random.Generator) -> list[tuple[str, str]]:
  """[(question, answer)]: `question` answered by the caption, then each attribute asked for."""
  turns = [(question, caption(**attributes))]
  for name in rng.permutation(list(FOLLOW_UPS)):
    value = attributes[name]
    turns.append((FOLLOW_UPS[name], "a " + value if name == "sound" and value != "noise" else value))
  return turns


def parse_caption(text: str) -> dict[str, str | None]:
  """The attribute values a caption names (None where it names none, or more than one: also the same
  value twice, so that a caption that repeats itself does not pass for a right one)."""
  text = text.lower()
  found = {}
  for name, values in ATTRIBUTES.items():
    hits = [v for v in values for _ in re.finditer(rf"\b{v}\b", text)]
    found[name] = hits[0] if len(hits) == 1 else None
  return found


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
  """[size, size] bool: `shape` of radius r centred at (cx, cy)."""
  y, x = np.mgrid[:size, :size] + 0.5
  dx, dy = x - cx, y - cy
  if shape == "circle":
    return dx ** 2 + dy ** 2 <= r ** 2
  if shape == "square":
    return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
  # Upward triangle: apex at the top, base at the bottom.
  return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))


def render_frames(colour: str, shape: str, direction: str, spec: VideoSpec,
                  rng: np.random.Generator) -> np.ndarray:
  """-> [fps * seconds, size, size, 3] uint8: the shape crossing the frame in `direction`.

  The path is centred on the frames that uniform sampling picks (0, 3, ..., 21 of 24), so that
  these frames, taken as a set, look the same for opposite directions: only their order tells
  "left" from "right". (Centred on the whole video, the sampled set would lean towards the start.)
  """
  n, s = int(spec.fps * spec.seconds), spec.size
  r = 0.22 * s                                                        # one size: shape is the outline
  dx, dy = DIRECTIONS[direction]
  first, last = sample_indices(n, spec.sampled_frames, "uniform")[[0, -1]]
  amplitude = rng.uniform(0.22, 0.26) * s
  travel = (np.arange(n) - (first + last) / 2) * (2 * amplitude / max(last - first, 1))  # along the axis
  side = rng.uniform(-0.15, 0.15) * s                                 # across it
  pixels = np.full((n, s, s, 3), spec.background, np.uint8)
  for i in range(n):
    cx = s / 2 + (dx * travel[i] if dx else side)
    cy = s / 2 + (dy * travel[i] if dy else side)
    pixels[i][_shape_mask(shape, s, cx, cy, r)] = COLOURS[colour]
  return pixels


def render_audio(sound: str, spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
  """-> [sample_rate * seconds] float32 in [-1, 1]."""
  n = int(spec.sample_rate * spec.seconds)
  freq = SOUNDS[sound]
  amplitude = rng.uniform(0.3, 0.6)
  if not freq:
    return (amplitude * rng.uniform(-1, 1, n)).astype(np.float32)
  t = np.arange(n) / spec.sample_rate
  return (amplitude * np.sin(2 * np.pi * freq * rng.uniform(0.95, 1.05) * t + rng.uniform(0, 2 * np.pi))
          ).astype(np.float32)


def write_mp4(path: str, frames: np.ndarray, audio: np.ndarray, spec: VideoSpec) -> None:
  """frames [T, H, W, 3] uint8 (H.264, yuv420p) + mono audio [S] float32 (AAC) -> `path` (a local file)."""
  import av
  with av.open(path, "w", format="mp4") as container:
    video = container.add_stream("libx264", rate=spec.fps, options={"crf": "18", "threads": "1"})
    video.width, video.height, video.pix_fmt = spec.size, spec.size, "yuv420p"
    sound = container.add_stream("aac", rate=spec.sample_rate, layout="mono")
    for image in frames:
      container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
    container.mux(video.encode())
    step = 1024  # AAC frame size
    for start in range(0, len(audio), step):
      chunk = audio[None, start:start + step]
      frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
      frame.sample_rate, frame.pts = spec.sample_rate, start
      frame.time_base = fractions.Fraction(1, spec.sample_rate)
      container.mux(sound.encode(frame))
    container.mux(sound.encode())


def write_split(out_dir: str, split: str, num_videos: int, seed: int, spec: VideoSpec = VideoSpec(),
                progress: bool = True) -> str:
  """Render `num_videos` videos of `split` under the local folder `out_dir` -> the CSV path."""
  from tqdm import tqdm
  if num_videos < 1:
    raise ValueError(f"{split}: need at least one video, got {num_videos}")
  rng = np.random.default_rng(seed)
  combos = list(itertools.product(*ATTRIBUTES.values()))
  order = [combos[i] for i in rng.permutation(len(combos))]
  video_dir = paths.join(out_dir, "videos", split)
  paths.makedirs(video_dir)
  rows, conversations = [], []
  for k in tqdm(range(num_videos), desc=f"writing {split} videos", unit="video", disable=not progress):
    attributes = dict(zip(ATTRIBUTES, order[k % len(order)]))
    videoid = f"{split}{k:05d}"
    frames = render_frames(attributes["colour"], attributes["shape"], attributes["direction"], spec, rng)
    audio = render_audio(attributes["sound"], spec, rng)
    write_mp4(paths.join(video_dir, f"{videoid}.mp4"), frames, audio, spec)
    rows.append(dict(videoid=videoid, contentUrl="", duration=f"PT00H00M{spec.seconds:02.0f}S", page_dir=split,
                     name=caption(**attributes), **attributes))
    turns = conversation(QUESTIONS[rng.integers(len(QUESTIONS))], attributes, rng)
    turns[0] = ("<video>\n" + turns[0][0], turns[0][1])
    conversations.append(dict(id=videoid, video=f"{split}/{videoid}.mp4", conversations=[
        {"from": speaker, "value": text} for turn in turns for speaker, text in zip(("human", "gpt"), turn)]))
  paths.write_text(paths.join(out_dir, f"{split}.json"), json.dumps(conversations, indent=1))
  text = io.StringIO()
  writer = csv.DictWriter(text, FIELDS)
  writer.writeheader()
  writer.writerows(rows)
  path = paths.join(out_dir, f"{split}.csv")
  paths.write_text(path, text.getvalue())
  return path


def make_dataset(out_dir: str, num_train: int = 480, num_val: int = 96, seed: int = 0,
                 spec: VideoSpec = VideoSpec(), progress: bool = True) -> dict[str, str]:
  """Write the train (seed) and val (seed + 1) splits, or reuse them when `out_dir` already
  holds this exact dataset. `out_dir` may be a URL (gs://...): the files are written locally, then
  copied there. -> {"train_csv", "train_json", "val_csv", "val_json", "videos": paths}."""
  meta = dict(version=GENERATOR_VERSION, num_train=num_train, num_val=num_val, seed=seed,
              spec=dataclasses.asdict(spec))
  out_dir = paths.resolve(out_dir)
  meta_path = paths.join(out_dir, "dataset.json")
  files = {f"{split}_{kind}": paths.join(out_dir, f"{split}.{kind}") for split in ("train", "val")
           for kind in ("csv", "json")}
  files["videos"] = paths.join(out_dir, "videos")
  if paths.exists(meta_path) and paths.read_json(meta_path) == meta:
    return files
  with paths.local_output(out_dir) as local:
    write_split(local, "train", num_train, seed, spec, progress)
    write_split(local, "val", num_val, seed + 1, spec, progress)
  paths.write_json(meta_path, meta)  # written last: a half-written dataset is redone
  return files


def read_split(csv_path: str) -> list[dict[str, str]]:
  """The rows of a split CSV (videoid, page_dir, name and the four attributes)."""
  with paths.open_text(csv_path) as f:
    return list(csv.DictReader(f))
