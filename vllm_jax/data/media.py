"""One media file -> everything Video-LLaMA takes from it: frames, timestamps and audio clips.

Behaviour on bad inputs (what `chat` prints and `infer` records):
  missing file              -> FileNotFoundError naming it
  corrupt / not decodable   -> MediaError naming it
  video without audio track -> frames only, `audio_valid=False` (answered from the frames)
  fewer frames than asked   -> every frame, padded and masked (see `vllm_jax.data.video`)
  images                    -> one frame (an animated one: its first), never audio
  a folder of frame images  -> a video at `folder_fps` frames per second, never audio
"""

import dataclasses

import numpy as np

from vllm_jax import paths
from vllm_jax.data import audio as audio_lib
from vllm_jax.data.long_video import LongVideo
from vllm_jax.data.video import Frames, MediaError, is_image_path, load_visual

__all__ = ["Media", "MediaError", "load_media", "media_path"]


@dataclasses.dataclass
class Media:
  path: str
  frames: Frames
  audio: np.ndarray | None = None   # [clips, 1, mel, frames] float32, when audio was asked for
  audio_valid: bool = False         # False: no audio track (or a silent or empty one)
  # How the frames were read, for a streamed video decoded again later (LLaMA-VID): only those within
  # these (start, end) seconds; a folder of frame images at this many frames per second.
  bounds: tuple[float, float] | None = None
  folder_fps: float | None = None
  movie: LongVideo | None = None    # a long video's feature file (LLaMA-VID): features and subtitles, no frames

  @property
  def is_image(self) -> bool:
    return self.frames.is_image


def media_path(root: str, name: str) -> str:
  """A media file named in an annotation file: `name` under the folder `root` (local, "" for the
  current one, or a URL such as gs://bucket/videos), or `name` itself when it is absolute or a URL."""
  return name if paths.is_url(name) else paths.join(root or ".", name)


def load_media(path: str, num_frames: int = 8, size: int = 224, with_audio: bool = False,
               audio_config: audio_lib.AudioClipConfig = audio_lib.AudioClipConfig(),
               bounds: tuple[float, float] | None = None, folder_fps: float | None = None, **video_kwargs) -> Media:
  """Frames of a video or image file (or, with `folder_fps`, a folder of frame images), and (with
  `with_audio`, video files only) its audio clips; only within `bounds` = (start, end) seconds
  when given (see `vllm_jax.data.video`)."""
  frames = load_visual(path, num_frames, size, bounds=bounds, folder_fps=folder_fps, **video_kwargs)
  if not with_audio or is_image_path(path) or folder_fps is not None:
    return Media(path, frames, bounds=bounds, folder_fps=folder_fps)
  try:
    clips, valid = audio_lib.load_audio_clips(path, audio_config, bounds)
  except audio_lib.AudioDecodeError as e:
    raise MediaError(str(e)) from e
  return Media(path, frames, clips, valid, bounds=bounds)
