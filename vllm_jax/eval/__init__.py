"""Evaluation on video-QA sets: each format reads its annotations into `Item`s and scores answers."""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Item:
  """One question of an evaluation set."""
  id: str                              # the set's question id: answers are resumed by it
  media: str                           # the video or image file (relative paths start at the media root)
  question: str
  answer: str                          # the reference answer (multiple choice: the correct option's text)
  category: str = "all"                # the per-category table's row
  candidates: tuple[str, ...] = ()     # multiple choice: the options, in order (A, B, C, ...)
  truth: dict[str, Any] = dataclasses.field(default_factory=dict)  # format-specific truth (e.g. attributes)
  groups: dict[str, str] = dataclasses.field(default_factory=dict)  # further tables: {table: this item's row}
  bounds: tuple[float, float] | None = None  # only the video's frames within (start, end) seconds are read
  folder_fps: float | None = None      # media is a folder of frame images, this many per second
  subtitles: tuple[tuple[float, float, str], ...] = ()  # (start s, end s, text): those at the frames are asked
