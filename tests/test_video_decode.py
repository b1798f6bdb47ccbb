"""H.264 frames decoded with PyAV (keyframe seeks, unreferenced pictures passed over) against decord's
`get_batch` on the same files: the same pixels, bit for bit."""

import av
import decord
import numpy as np
import pytest

from vllm_jax.data import video as V


def write_textured(path, num_frames=90, size=(72, 128), codec="libx264", gop=30):
  """A panning noisy texture (B-frames, a keyframe every `gop` frames), every frame different."""
  height, width = size
  rng = np.random.default_rng(0)
  texture = rng.integers(0, 256, (height + num_frames, width + num_frames, 3), np.uint8)
  with av.open(str(path), "w") as out:
    stream = out.add_stream(codec, rate=30)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"g": str(gop)}
    for i in range(num_frames):
      pixels = np.ascontiguousarray(texture[i:i + height, i:i + width])
      out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
    out.mux(stream.encode())
  return str(path)


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
  return write_textured(tmp_path_factory.mktemp("video") / "textured.mp4")


def index_sets(vlen):
  rng = np.random.default_rng(1)
  return ([V.sample_indices(vlen, 8, "headtail", rng) for _ in range(3)]
          + [V.sample_indices(vlen, 8, "linspace"), V.sample_indices(vlen, 8), np.arange(0, vlen, 30),
             [vlen - 1], [0, 0, 5], [vlen - 1, 3, 3, 40]])


@pytest.mark.parametrize("size", [None, 40])
def test_frames_equal_decords(textured, size):
  resize = dict(width=size, height=size) if size else {}
  reader = decord.VideoReader(textured, num_threads=1, **resize)
  ours = V.H264Reader.open(textured, size, size)
  assert len(ours) == len(reader) and ours.get_avg_fps() == reader.get_avg_fps()
  for indices in index_sets(len(reader)):
    indices = [int(i) for i in indices]
    frames = ours._decode(indices)  # None would mean decord's fallback
    assert frames is not None
    np.testing.assert_array_equal(frames, reader.get_batch(indices).asnumpy())


def test_unreferenced_pictures_are_found(textured):
  with av.open(textured) as container:
    stream = container.streams.video[0]
    length_size = V._avc_length_size(stream.codec_context)
    referenced = [V._is_referenced(bytes(p), length_size) for p in container.demux(stream) if p.size]
  assert length_size == 4 and 20 < referenced.count(False) < len(referenced) - 20


def test_other_codecs_go_to_decord(tmp_path):
  path = write_textured(tmp_path / "mpeg4.mp4", num_frames=20, codec="mpeg4", gop=10)
  assert V.H264Reader.open(path) is None
  out = V.load_video(path, num_frames=4)
  assert out.frames.shape == (4, 224, 224, 3) and out.frame_mask.all()


def test_load_video_and_frame_stream_read_h264_without_decord(textured, monkeypatch):
  reader = decord.VideoReader(textured, width=224, height=224, num_threads=1)
  want = V.normalize(reader.get_batch([int(i) for i in V.sample_indices(len(reader), 8)]).asnumpy())
  native = decord.VideoReader(textured, num_threads=1).get_batch([0, 30, 60]).asnumpy()
  monkeypatch.setattr(decord, "VideoReader", None)
  np.testing.assert_array_equal(V.load_video(textured, num_frames=8).frames, want)
  stream = V.FrameStream(textured, fps=1.0)
  assert isinstance(stream.reader, V.H264Reader) and stream.timestamps == [0.0, 1.0, 2.0]
  np.testing.assert_array_equal(V._decode(stream.reader, textured, stream.indices), native)
