"""Frame loading from real files: h264/AAC mp4s written with PyAV and decoded by decord, images."""

import fractions
import time

import av
import numpy as np
import pytest
from PIL import Image

from vllm_jax.data import video as V
from vllm_jax.data.media import MediaError, load_media


def write_video(path, num_frames=30, fps=10, size=(48, 64), audio_seconds=None, gop=None):
  """An h264 mp4 whose frame i is flat gray at level 8 * i (mod 256), with a 440 Hz AAC
  track of `audio_seconds` when given. `fps` may be a Fraction (e.g. 1/10 for sparse videos)."""
  height, width = size
  with av.open(str(path), "w") as out:
    stream = out.add_stream("libx264", rate=fractions.Fraction(fps))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if gop:
      stream.options = {"g": str(gop)}
    sound = out.add_stream("aac", rate=16000) if audio_seconds else None
    if sound is not None:
      sound.layout = "mono"
    for i in range(num_frames):
      frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), i * 8 % 256, np.uint8), format="rgb24")
      out.mux(stream.encode(frame))
    out.mux(stream.encode())
    if sound is not None:
      t = np.arange(int(audio_seconds * 16000)) / 16000
      wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
      for start in range(0, wave.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start:start + 1024]), format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts = 16000, start
        out.mux(sound.encode(frame))
      out.mux(sound.encode())
  return str(path)


def gray_levels(frames):
  """Normalised frames [T, H, W, 3] -> the mean 0-255 level of each frame."""
  return ((frames * V.CLIP_STD + V.CLIP_MEAN) * 255).mean(axis=(1, 2, 3))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", audio_seconds=3.0)


def test_uniform_sampling_frames_and_timestamps(clip):
  out = V.load_video(clip, num_frames=8)
  indices = [0, 3, 7, 11, 15, 18, 22, 26]  # arange(0, 30, 30 / 8) truncated
  assert out.frames.shape == (8, 224, 224, 3) and out.frames.dtype == np.float32
  assert out.frame_mask.all() and not out.is_image
  assert out.timestamps == [round(i / 10, 1) for i in indices] == [0.0, 0.3, 0.7, 1.1, 1.5, 1.8, 2.2, 2.6]
  np.testing.assert_allclose(gray_levels(out.frames), 8 * np.array(indices), atol=3)


def test_headtail_sampling_halves_and_seed():
  rng = lambda: np.random.default_rng(0)
  idx = V.sample_indices(100, 8, "headtail", rng())
  assert len(idx) == 8 and (idx[:4] < 50).all() and (idx[4:] >= 50).all()
  assert (np.diff(idx[:4]) > 0).all() and (np.diff(idx[4:]) > 0).all()
  np.testing.assert_array_equal(idx, V.sample_indices(100, 8, "headtail", rng()))
  np.testing.assert_array_equal(V.sample_indices(3, 8, "headtail"), [0, 1, 2])
  with pytest.raises(ValueError, match="unknown sampling"):
    V.sample_indices(10, 8, "random")


def test_training_crop_is_shared_by_frames(clip):
  out = V.load_video(clip, num_frames=4, sampling="headtail", train_crop=True, rng=np.random.default_rng(1))
  assert out.frames.shape == (4, 224, 224, 3)
  # Flat frames stay flat under any crop; their levels still identify the sampled frames.
  assert np.ptp(gray_levels(out.frames)) > 50
  frame = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
  crops = V.random_resized_crop(np.stack([frame, frame]), 16, np.random.default_rng(0))
  assert crops.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(crops[0], crops[1])  # one box for the whole clip
  for seed in range(20):  # every crop covers 50-100% of the area with aspect in [3/4, 4/3]
    top, left, h, w = V._crop_box(40, 50, np.random.default_rng(seed), (0.5, 1.0), (3 / 4, 4 / 3))
    assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 50
    assert 0.45 <= h * w / 2000 <= 1.0


@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_images_are_one_frame_videos(tmp_path, ext):
  pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)
  path = str(tmp_path / f"img.{ext}")
  Image.fromarray(pixels).save(path, quality=100) if ext != "png" else Image.fromarray(pixels).save(path)
  out = V.load_visual(path, num_frames=8)
  assert out.is_image and out.frames.shape == (8, 224, 224, 3) and out.timestamps == [0.0]
  np.testing.assert_array_equal(out.frame_mask, [True] + [False] * 7)
  if ext == "png":  # lossless: exactly PIL's bicubic resize, normalised
    expected = V.normalize(np.asarray(Image.fromarray(pixels).resize((224, 224), Image.BICUBIC)))
    np.testing.assert_allclose(out.frames[0], expected, atol=1e-6)
  assert V.load_image(path).frames.shape == (1, 224, 224, 3)


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.mp4"):
    V.load_video(str(tmp_path / "nothere.mp4"))
  corrupt = tmp_path / "corrupt.mp4"
  corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 50)
  with pytest.raises(MediaError, match="corrupt.mp4"):
    V.load_video(str(corrupt))
  bad_image = tmp_path / "bad.png"
  bad_image.write_bytes(b"\x89PNG not really")
  with pytest.raises(MediaError, match="bad.png"):
    V.load_visual(str(bad_image))


def test_one_frame_video_is_padded_and_masked(tmp_path):
  out = V.load_video(write_video(tmp_path / "one.mp4", num_frames=1), num_frames=8)
  assert out.timestamps == [0.0]
  np.testing.assert_array_equal(out.frame_mask, [True] + [False] * 7)
  np.testing.assert_array_equal(out.frames[1:], np.repeat(out.frames[:1], 7, axis=0))


def test_two_hour_sparse_video_decodes_only_the_samples(tmp_path):
  start = time.perf_counter()
  path = write_video(tmp_path / "long.mp4", num_frames=720, fps=fractions.Fraction(1, 10), size=(32, 32), gop=1000)
  out = V.load_video(path, num_frames=8)
  assert time.perf_counter() - start < 10
  assert out.timestamps == [0.0, 900.0, 1800.0, 2700.0, 3600.0, 4500.0, 5400.0, 6300.0]
  np.testing.assert_allclose(gray_levels(out.frames), [(90 * k * 8) % 256 for k in range(8)], atol=3)


def test_load_media_with_and_without_audio(tmp_path, clip):
  media = load_media(clip, num_frames=4, with_audio=True)
  assert media.audio_valid and media.audio.shape == (8, 1, 128, 204)
  silent = load_media(write_video(tmp_path / "mute.mp4"), num_frames=4, with_audio=True)
  assert not silent.audio_valid and not silent.audio.any()
  assert load_media(clip, num_frames=4).audio is None


def test_audio_only_file_given_as_video_says_so(tmp_path):
  path = str(tmp_path / "speech.m4a")
  with av.open(path, "w", format="mp4") as out:
    sound = out.add_stream("aac", rate=16000)
    sound.layout = "mono"
    tone = np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000).astype(np.float32)[None]
    for start in range(0, 16000, 1024):
      frame = av.AudioFrame.from_ndarray(tone[:, start:start + 1024], format="fltp", layout="mono")
      frame.sample_rate, frame.pts, frame.time_base = 16000, start, fractions.Fraction(1, 16000)
      out.mux(sound.encode(frame))
    out.mux(sound.encode())
  with pytest.raises(MediaError, match="has no video stream"):
    load_media(path, 4, 32)


def test_bounds_and_frame_folders_for_every_sampler(tmp_path):
  """Frames only within [start, end] seconds, from a video or a folder of frame images (the i-th at
  i / folder_fps s): uniform and linspace sampling, the 1 fps stream, the audio clips; none there
  is an error naming the file."""
  video = write_video(tmp_path / "clip.mp4", num_frames=40, fps=10, size=(32, 32), audio_seconds=4)
  folder = tmp_path / "frames"
  folder.mkdir()
  for i in range(1, 25):
    Image.fromarray(np.full((24, 32, 3), 8 * i, np.uint8)).save(folder / f"{i:05d}.png")
  assert V.load_video(video, 4, 32, bounds=(1.2, 2.5)).timestamps == [1.2, 1.5, 1.9, 2.2]
  assert V.load_video(video, 4, 32, sampling="linspace", bounds=(1.2, 2.5)).timestamps == [1.2, 1.6, 2.0, 2.5]
  assert V.FrameStream(video, 1.0, None, (1.2, 3.5)).timestamps == [1.2, 2.2, 3.2]
  out = V.load_video(str(folder), 4, 32, bounds=(2.0, 6.0), folder_fps=3.0)
  assert out.timestamps == [2.0, 3.0, 4.0, 5.0]
  np.testing.assert_allclose(gray_levels(out.frames), [56, 80, 104, 128], atol=2)  # files 7, 10, 13, 16
  stream = V.FrameStream(str(folder), 1.0, None, (2.0, 6.0), 3.0)
  assert stream.timestamps == [2.0, 3.0, 4.0, 5.0, 6.0] and next(stream.chunks(8, 32)).shape == (5, 32, 32, 3)
  assert load_media(video, 4, 32, with_audio=True, bounds=(1.0, 2.0)).audio_valid
  assert load_media(str(folder), 4, 32, with_audio=True, folder_fps=3.0).audio is None
  with pytest.raises(MediaError, match=r"clip.mp4 has no frame within 9-10 s \(40 frames at 10 fps\)"):
    V.load_video(video, 4, 32, bounds=(9, 10))
  with pytest.raises(FileNotFoundError, match="frame folder not found: .*nowhere"):
    V.load_video(str(tmp_path / "nowhere"), 4, 32, folder_fps=3.0)
