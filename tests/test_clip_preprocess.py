"""Video-LLaVA's preprocessing (`sampling="linspace"`, `resize="short_side_crop"`) against torch
transcriptions of its reference pipeline and transformers' CLIPImageProcessor, on real files."""

import math

import av
import decord
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_video_loading import gray_levels, write_video
from transformers import CLIPImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vllm_jax.data import video as V
from vllm_jax.data.media import load_media

LLAVA = dict(sampling="linspace", resize="short_side_crop")


def write_textured_video(path, num_frames, size):
  """An h264 mp4 of gradients plus noise, different in every frame: flat frames (`write_video`)
  look the same under any resize, so they cannot check one."""
  height, width = size
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:height, :width]
  with av.open(str(path), "w") as out:
    stream = out.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(num_frames):
      base = np.stack([xx * 255 / width, yy * 255 / height, np.full(xx.shape, i * 8 % 256)], -1)
      pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
      out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
    out.mux(stream.encode())
  return str(path)


def reference_transform(pixels):
  """Video-LLaVA's decord-path transform in torch: [T, H, W, 3] uint8 -> [T, 224, 224, 3]:
  /255, NormalizeVideo, pytorchvideo ShortSideScale(224), CenterCropVideo(224)."""
  x = torch.from_numpy(pixels).permute(3, 0, 1, 2) / 255.0  # [C, T, H, W]
  mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None, None]
  std = torch.tensor(OPENAI_CLIP_STD)[:, None, None, None]
  x = (x - mean) / std
  h, w = x.shape[-2:]
  if w < h:
    size = (int(math.floor((float(h) / w) * 224)), 224)
  else:
    size = (224, int(math.floor((float(w) / h) * 224)))
  x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
  i, j = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
  return x[..., i:i + 224, j:j + 224].permute(1, 2, 3, 0).numpy()


def test_linspace_indices_match_reference():
  for vlen in (8, 9, 30, 31, 100, 1000, 7201):
    np.testing.assert_array_equal(V.sample_indices(vlen, 8, "linspace"), np.linspace(0, vlen - 1, 8, dtype=int))
  np.testing.assert_array_equal(V.sample_indices(30, 8, "linspace"), [0, 4, 8, 12, 16, 20, 24, 29])  # truncated
  # Shorter than asked: frames repeat, as Video-LLaVA samples them (its towers read all 8).
  np.testing.assert_array_equal(V.sample_indices(3, 8, "linspace"), [0, 0, 0, 0, 1, 1, 1, 2])


def test_linspace_on_a_real_video(tmp_path):
  path = write_video(tmp_path / "clip.mp4", num_frames=30, size=(64, 96))
  indices = [0, 4, 8, 12, 16, 20, 24, 29]
  for resize in V.RESIZE_MODES:
    out = V.load_video(path, num_frames=8, sampling="linspace", resize=resize)
    assert out.frames.shape == (8, 224, 224, 3) and out.frames.dtype == np.float32 and out.frame_mask.all()
    assert out.timestamps == [round(i / 10, 1) for i in indices]
    np.testing.assert_allclose(gray_levels(out.frames), 8 * np.array(indices), atol=3)
  short = V.load_video(write_video(tmp_path / "short.mp4", num_frames=3, size=(64, 96)), num_frames=8, **LLAVA)
  assert short.frame_mask.all() and short.timestamps == [0.0] * 4 + [0.1] * 3 + [0.2]
  np.testing.assert_allclose(gray_levels(short.frames), 8 * np.array([0, 0, 0, 0, 1, 1, 1, 2]), atol=3)


# (height, width): upsampled landscape and portrait; (64, 70) is resized to 224 x 245, crop offset
# 10.5, which Python's round takes to 10 (half up would give 11); a downsampled frame.
@pytest.mark.parametrize("size", [(64, 96), (96, 64), (64, 70), (256, 352)])
def test_video_frames_match_reference_pipeline(tmp_path, size):
  path = write_textured_video(tmp_path / "textured.mp4", num_frames=20, size=size)
  out = V.load_video(path, num_frames=8, **LLAVA)
  reader = decord.VideoReader(path)  # native size, as the reference decodes
  pixels = reader.get_batch(np.linspace(0, len(reader) - 1, 8, dtype=int).tolist()).asnumpy()
  assert pixels.shape[1:3] == size and np.ptp(pixels) > 200
  np.testing.assert_allclose(out.frames, reference_transform(pixels), rtol=0, atol=1e-4)


# (14, 122): floor(122 / 14 * 224) is 1951, one short of the exact 1952; (1080, 1920): source
# coordinates large enough for their float32 rounding to matter.
@pytest.mark.parametrize("size", [(14, 122), (122, 14), (225, 301), (224, 224), (1080, 1920)])
def test_short_side_crop_matches_reference_on_arrays(size):
  pixels = np.random.default_rng(0).integers(0, 256, (2, *size, 3), np.uint8)
  ours = V.normalize(V.short_side_crop(pixels, 224))
  np.testing.assert_allclose(ours, reference_transform(pixels), rtol=0, atol=1e-4)


# (305, 300): resized to 227 x 224, crop offset (227 - 224) // 2 = 1 where the video path's round gives 2.
@pytest.mark.parametrize("size", [(30, 40), (40, 30), (300, 501), (501, 300), (224, 224), (305, 300)])
def test_images_match_clip_image_processor(tmp_path, size):
  path = str(tmp_path / "img.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), np.uint8)).save(path)
  processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size=224, image_mean=OPENAI_CLIP_MEAN,
                                    image_std=OPENAI_CLIP_STD)
  with Image.open(path) as image:
    expected = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  out = V.load_image(path, resize="short_side_crop")
  assert out.is_image and out.frames.shape == (1, 224, 224, 3)
  np.testing.assert_allclose(out.frames[0], expected, rtol=0, atol=1e-4)


def test_load_media_forwards_the_options(tmp_path):
  video = write_textured_video(tmp_path / "textured.mp4", num_frames=12, size=(64, 96))
  image = str(tmp_path / "img.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)).save(image)
  np.testing.assert_array_equal(load_media(video, 8, 224, **LLAVA).frames.frames,
                                V.load_video(video, 8, 224, **LLAVA).frames)
  media = load_media(image, 8, 224, **LLAVA)
  np.testing.assert_array_equal(media.frames.frames[0], V.load_image(image, resize="short_side_crop").frames[0])
  np.testing.assert_array_equal(media.frames.frame_mask, [True] + [False] * 7)
  assert not np.array_equal(media.frames.frames[0], V.load_image(image).frames[0])
  with pytest.raises(ValueError, match="unknown resize"):
    V.load_visual(video, resize="crop")
  with pytest.raises(ValueError, match="unknown resize"):
    V.load_visual(image, resize="crop")
