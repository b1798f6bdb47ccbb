"""Long videos as LLaMA-VID's long-video stage trains on them: a feature file per movie instead of
its frames (the released MovieNet data, `long_videoqa.json` naming `movienet/*.pkl`; a video and
its subtitles made into one: `vllm-jax make-feature-files`).

A feature file is a pickled dict:
  feats:  [T, 1+G*G, D] float16, the ViT's features of T frames (CLS first);
  inputs: str, T frame marks "<image>", each followed by the subtitles spoken until the next
          frame ("<image>Hello.<image><image>Who is it? Nobody." ...).
It is read with an unpickler that builds nothing but arrays, dicts and strings: a file holding
anything else is refused, so a feature file cannot run code. Training reads the subtitles without
"...", the reference's movie chat as written (`LongVideo.framed`).
"""

import dataclasses
import io
import pickle
import re

import numpy as np

from vllm_jax import paths

FRAME_MARK = "<image>"
SUFFIX = ".pkl"
# How the reference's movie chat frames a movie before the question.
MOVIE_START = "Below is a movie. Memorize the content and answer my question after watching this movie."
MOVIE_END = "Now the movie end."
_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
            ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
            ("numpy._core.numeric", "_frombuffer")}


class _ArraysOnly(pickle.Unpickler):
  def find_class(self, module, name):
    module = module.replace("numpy.core.", "numpy._core.")  # numpy 1's names, as the released files have them
    if (module, name) not in _ALLOWED:
      raise pickle.UnpicklingError(f"it holds a {module}.{name}; a feature file holds only arrays and text")
    return super().find_class(module, name)


@dataclasses.dataclass(frozen=True)
class LongVideo:
  """features [T, N, D] (the file's, without CLS: N = G*G) and texts: T + 1 pieces, the text
  before the first frame, then the subtitles after each frame."""
  features: np.ndarray
  texts: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.features)

  def thinned(self, max_frames: int | None) -> "LongVideo":
    """At most `max_frames` frames (None: all), evenly spread (as longer videos are thinned); the
    subtitles after a dropped frame follow the kept frame before it, so that no text is lost."""
    if max_frames is None or len(self) <= max_frames:
      return self
    kept = np.linspace(0, len(self) - 1, max_frames).astype(int)
    ends = list(kept[1:]) + [len(self)]
    texts = [self.texts[0]] + [" ".join(t for t in self.texts[1 + k:1 + end] if t) for k, end in zip(kept, ends)]
    return LongVideo(self.features[kept], tuple(texts))

  def prompt(self) -> str:
    """The frames' marks with their subtitles, as the movie's place in a question."""
    return self.texts[0] + "".join(FRAME_MARK + t for t in self.texts[1:])

  def framed(self) -> str:
    """The movie as a question's media turn, framed as the reference's movie chat frames it."""
    return MOVIE_START + self.prompt() + MOVIE_END


def is_feature_file(path: str) -> bool:
  return path.lower().endswith(SUFFIX)


@dataclasses.dataclass(frozen=True)
class Subtitle:
  start: float  # seconds
  end: float
  text: str


_SRT_TIME = r"(\d+):(\d\d):(\d\d)[,.](\d{1,3})"
_SRT_TIMING = re.compile(rf"^\s*{_SRT_TIME}\s*-->\s*{_SRT_TIME}")


def _seconds(hours: str, minutes: str, seconds: str, milliseconds: str) -> float:
  return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(milliseconds.ljust(3, "0")) / 1000


def read_srt(path: str) -> list[Subtitle]:
  """An .srt file's subtitles (blocks of a number, "HH:MM:SS,mmm --> HH:MM:SS,mmm" and text lines,
  joined by spaces, markup such as <i> removed); ValueError naming the file and the block that is
  not one."""
  subtitles = []
  text = paths.read_text(path).lstrip("\ufeff").replace("\r\n", "\n").strip()
  for number, block in enumerate(re.split(r"\n\s*\n", text) if text else [], 1):
    lines = block.strip().splitlines()
    timing = next((k for k, line in enumerate(lines[:2]) if "-->" in line), None)
    match = _SRT_TIMING.match(lines[timing]) if timing is not None else None
    if match is None:
      raise ValueError(f"{path}: subtitle {number} has no timing line (HH:MM:SS,mmm --> HH:MM:SS,mmm): {block[:80]!r}")
    times = match.groups()
    words = re.sub(r"<[^>]*>", "", " ".join(line.strip() for line in lines[timing + 1:])).strip()
    if words:
      subtitles.append(Subtitle(_seconds(*times[:4]), _seconds(*times[4:]), words))
  return subtitles


def subtitled(frame_times: np.ndarray, subtitles: list[Subtitle]) -> str:
  """A feature file's `inputs` for frames shown at `frame_times` (seconds, ascending): a mark per
  frame, each subtitle after the last frame shown before it ends (the first frame for one that ends
  before any), as the reference's extraction places them."""
  texts = [[] for _ in frame_times]
  for subtitle in sorted(subtitles, key=lambda s: s.end):
    shown = int(np.searchsorted(frame_times, subtitle.end, side="left"))  # frames before its end
    texts[max(shown - 1, 0)].append(subtitle.text)
  return "".join(FRAME_MARK + " ".join(t) for t in texts)


def dumps(features: np.ndarray, inputs: str) -> bytes:
  """A feature file as the reference writes one: features [T, 1+G*G, D] (CLS first) as float16."""
  if len(features) != inputs.count(FRAME_MARK):
    raise ValueError(f"{len(features)} frames, {inputs.count(FRAME_MARK)} marks")
  return pickle.dumps(dict(feats=np.asarray(features, np.float16), inputs=inputs), protocol=4)


def load(path: str) -> LongVideo:
  """The feature file at `path` (local or a URL) -> LongVideo, its features' CLS dropped as the
  reference reads them. ValueError when it is not such a file."""
  try:
    info = _ArraysOnly(io.BytesIO(paths.read_bytes(path))).load()
    features, inputs = info["feats"], info["inputs"]
  except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, IndexError) as e:
    raise ValueError(f"{path} is not a long-video feature file (a pickled dict of feats [T, 1+G*G, D] "
                     f"and inputs): {type(e).__name__}: {e}") from None
  if not isinstance(features, np.ndarray) or features.ndim != 3 or not isinstance(inputs, str):
    raise ValueError(f"{path}: feats must be an array [T, 1+G*G, D] and inputs a string")
  texts = inputs.split(FRAME_MARK)
  if len(texts) - 1 != len(features):
    raise ValueError(f"{path}: inputs marks {len(texts) - 1} frames, feats holds {len(features)}")
  return LongVideo(features[:, 1:], tuple(texts))
