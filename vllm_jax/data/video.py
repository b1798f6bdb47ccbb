"""Frames for Video-LLaMA's vision branch: decord decoding, frame sampling, CLIP normalisation.

A video becomes N frames [N, 224, 224, 3] float32 (channels-last, as `vllm_jax.models.vit`
takes them), resized straight to 224x224 by the decoder (no crop: the aspect ratio is not
kept, as in Video-LLaMA), scaled to [0, 1] and normalised with CLIP's mean and std. Only the
sampled frames are decoded (`get_batch` seeks to each), so a long video costs N decodes,
not its length.

Sampling (over the video's `vlen` frames):
  uniform   (evaluation, chat): indices arange(0, vlen, vlen / n) truncated to int;
  headtail  (training): n//2 sorted random frames from the first half, the rest from the
            second half.
A video with fewer frames than requested is sampled at every frame, like Video-LLaMA
(`min(n, vlen)` frames); the result is then padded to N by repeating the last frame, with
`frame_mask` False on the padding, so batches keep static shapes and the vision branch masks
the padding out (which equals running it on the real frames only). `timestamps` lists the
real frames only; they go into the prompt.

An image is a one-frame video: bicubic resize to 224x224 (PIL), same normalisation.
"""

import dataclasses
import math
import os

import numpy as np

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class MediaError(ValueError):
  """A media file exists but cannot be decoded (corrupt, truncated, not a video/image)."""


@dataclasses.dataclass
class Frames:
  frames: np.ndarray       # [N, size, size, 3] float32, normalised
  frame_mask: np.ndarray   # [N] bool, False on padding frames
  timestamps: list[float]  # seconds of the real frames, rounded to 0.1 s
  is_image: bool = False


def normalize(pixels: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std."""
  return ((pixels.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)


def sample_indices(vlen: int, num_frames: int, sampling: str = "uniform",
                   rng: np.random.Generator | None = None) -> np.ndarray:
  """Frame indices [min(num_frames, vlen)], increasing."""
  n = min(num_frames, vlen)
  if sampling == "uniform":
    return np.arange(0, vlen, vlen / n).astype(int)[:n]
  if sampling == "headtail":
    rng = rng or np.random.default_rng()
    half = vlen // 2
    head = np.sort(rng.choice(half, n // 2, replace=False)) if n // 2 else np.zeros(0, int)
    tail = np.sort(rng.choice(np.arange(half, vlen), n - n // 2, replace=False))
    return np.concatenate([head, tail]).astype(int)
  raise ValueError(f"unknown sampling {sampling!r}; expected 'uniform' or 'headtail'")


def pad_frames(frames: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
  """[n, ...] -> ([num_frames, ...] with the last frame repeated, mask [num_frames])."""
  n = frames.shape[0]
  mask = np.arange(num_frames) < n
  if n < num_frames:
    frames = np.concatenate([frames, np.repeat(frames[-1:], num_frames - n, axis=0)])
  return frames, mask


def random_resized_crop(frames: np.ndarray, size: int, rng: np.random.Generator,
                        scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """One random crop (area fraction in `scale`, aspect in `ratio`, as torchvision picks it)
  applied to every frame, each resized back to size x size bicubically.

  frames: [T, H, W, 3] uint8 -> [T, size, size, 3] uint8.
  """
  from PIL import Image
  height, width = frames.shape[1:3]
  top, left, h, w = _crop_box(height, width, rng, scale, ratio)
  return np.stack([np.asarray(Image.fromarray(f[top:top + h, left:left + w]).resize(
      (size, size), Image.BICUBIC)) for f in frames])


def _crop_box(height, width, rng, scale, ratio):
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  # Fallback: the largest centred crop whose aspect lies within `ratio`.
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif aspect > ratio[1]:
    h, w = height, round(height * ratio[1])
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _check_exists(path: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"media file not found: {path}")


def load_video(path: str, num_frames: int = 8, size: int = 224, sampling: str = "uniform",
               rng: np.random.Generator | None = None, train_crop: bool = False,
               num_threads: int = 2) -> Frames:
  """Decode `num_frames` sampled frames of a video file; see the module doc.

  `train_crop` applies the training RandomResizedCrop (scale 0.5-1, bicubic) to the decoded
  frames. `num_threads` are decord's decoding threads for this reader (keep it small when
  several readers run in parallel). Raises FileNotFoundError or MediaError.
  """
  import decord
  _check_exists(path)
  try:
    reader = decord.VideoReader(path, width=size, height=size, num_threads=num_threads)
    vlen, fps = len(reader), float(reader.get_avg_fps())
    if vlen == 0:
      raise MediaError(f"{path} has no video frames")
    indices = sample_indices(vlen, num_frames, sampling, rng)
    pixels = reader.get_batch(indices.tolist()).asnumpy()  # [n, size, size, 3] uint8
  except (decord.DECORDError, RuntimeError) as e:  # decord raises RuntimeError on open
    raise MediaError(f"cannot decode video {path}: {str(e).splitlines()[0]}") from e
  if train_crop:
    pixels = random_resized_crop(pixels, size, rng or np.random.default_rng())
  frames, mask = pad_frames(normalize(pixels), num_frames)
  fps = fps if fps > 0 else 1.0
  return Frames(frames, mask, [round(float(i) / fps, 1) for i in indices])


def load_image(path: str, num_frames: int = 1, size: int = 224) -> Frames:
  """An image file as a one-frame video (padded to `num_frames` masked frames if > 1)."""
  from PIL import Image, UnidentifiedImageError
  _check_exists(path)
  try:
    with Image.open(path) as image:
      pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
  except (UnidentifiedImageError, OSError) as e:
    raise MediaError(f"cannot decode image {path}: {e}") from e
  frames, mask = pad_frames(normalize(pixels)[None], num_frames)
  return Frames(frames, mask, [0.0], is_image=True)


def is_image_path(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def load_visual(path: str, num_frames: int = 8, size: int = 224, **kwargs) -> Frames:
  """A video or (by extension) an image file -> Frames."""
  if is_image_path(path):
    return load_image(path, num_frames, size)
  return load_video(path, num_frames, size, **kwargs)
