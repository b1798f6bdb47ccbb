"""Frames for the vision towers (Video-LLaMA, Video-LLaVA, LLaMA-VID): decord decoding, frame sampling,
resizing, CLIP normalisation.

A video becomes N frames [N, 224, 224, 3] float32 (channels-last, as `vllm_jax.models.vit`
takes them), resized straight to 224x224 by the decoder (no crop: the aspect ratio is not
kept, as in Video-LLaMA), scaled to [0, 1] and normalised with CLIP's mean and std. Only the
sampled frames are decoded, so a long video costs N decodes, not its length. H.264 in mp4 (local
files) is decoded with PyAV from the keyframe before each sampled frame, passing over the packets
of pictures that no other picture references (non-reference B-frames), unless sampled; the frames
are those decord gives, bit for bit (the same FFmpeg decoder; resized by the same bilinear scale
filter, then converted to RGB). Other codecs and stored objects are decoded by decord's `get_batch`.

Sampling (over the video's `vlen` frames):
  uniform   (evaluation, chat): indices arange(0, vlen, vlen / n) truncated to int;
  headtail  (training): n//2 sorted random frames from the first half, the rest from the
            second half;
  linspace  (Video-LLaVA): linspace(0, vlen - 1, n) truncated to int (first and last frame
            included).
A video with fewer frames than requested is sampled at every frame, like Video-LLaMA
(`min(n, vlen)` frames); the result is then padded to N by repeating the last frame, with
`frame_mask` False on the padding, so batches keep static shapes and the vision branch masks
the padding out (which equals running it on the real frames only). `timestamps` lists the
real frames only; they go into the prompt.

An image is a one-frame video: bicubic resize to 224x224 (PIL), same normalisation. Every PIL
mode is first made 8-bit RGB: 16-bit values keep their range (0..65535 -> 0..255, >> 8, as
PIL reads 16-bit RGB), transparency is composited over white (as CLIPImageProcessor does),
and an animated image (gif, webp, apng) is read as its first frame.

LLaMA-VID samples a video at 1 fps and resizes each frame as an image (below); `FrameStream`
decodes such a video a chunk of frames at a time.

`bounds` = (start, end) seconds restricts either sampling to the frames within [start, end]
(MVBench's bounded tasks); their timestamps stay the video's own. `folder_fps` reads a folder of
frame images (in name order, the i-th at i / folder_fps seconds; MVBench's TVQA frames) as a video.

`resize="short_side_crop"` is Video-LLaVA's preprocessing instead (`resize="squash"`, the
default, is the above). Videos are decoded at their native size and each frame is resized so
its short side is 224 (pytorchvideo's ShortSideScale: torch bilinear, align_corners=False, no
antialiasing, long side floor(long / short * 224)), then centre-cropped to 224x224 (torchvision
CenterCropVideo: offsets round((side - 224) / 2), halves to even). Images follow
transformers' CLIPImageProcessor: PIL bicubic resize of the short side to 224 (long side
int(224 * long / short)), centre crop with offsets (side - 224) // 2. Both use the same
OpenAI CLIP mean and std as above.

`resize="pad"` (images only) is the LLaVA-1.5 family's image_aspect_ratio "pad", which
Video-LLaVA's and LLaMA-VID's instruction stages train with: the image pasted centred on a square
canvas of the CLIP mean colour (int(255 * mean) per channel: 122, 116, 104; offsets
(side - short) // 2), then resized as CLIPImageProcessor resizes (a square needs no crop).
"""

import dataclasses
import io
import math

import numpy as np

from vllm_jax import paths

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESIZE_MODES = ("squash", "short_side_crop")
IMAGE_RESIZE_MODES = RESIZE_MODES + ("pad",)
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN.tolist())  # the reference's background: (122, 116, 104)
ASPECT_RATIOS = ("square", "pad")  # a recipe's data.image_aspect_ratio, the references' flag


class MediaError(ValueError):
  """A media file exists but cannot be decoded (corrupt, truncated, not a video/image)."""


@dataclasses.dataclass
class Frames:
  frames: np.ndarray | None  # [N, size, size, 3] float32, normalised (None: streamed, see FrameStream)
  frame_mask: np.ndarray   # [N] bool, False on padding frames
  timestamps: list[float]  # seconds of the real frames, rounded to 0.1 s
  is_image: bool = False


def normalize(pixels: np.ndarray) -> np.ndarray:
  """[..., 3] on the 0-255 scale (uint8 or float) -> float32 (x / 255 - mean) / std."""
  return ((pixels.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)


def sample_indices(vlen: int, num_frames: int, sampling: str = "uniform",
                   rng: np.random.Generator | None = None) -> np.ndarray:
  """Frame indices, increasing: [min(num_frames, vlen)], or for "linspace" always [num_frames]
  (a short video repeats frames, as Video-LLaVA samples it)."""
  n = min(num_frames, vlen)
  if sampling == "uniform":
    return np.arange(0, vlen, vlen / n).astype(int)[:n]
  if sampling == "headtail":
    rng = rng or np.random.default_rng()
    half = vlen // 2
    head = np.sort(rng.choice(half, n // 2, replace=False)) if n // 2 else np.zeros(0, int)
    tail = np.sort(rng.choice(np.arange(half, vlen), n - n // 2, replace=False))
    return np.concatenate([head, tail]).astype(int)
  if sampling == "linspace":
    return np.linspace(0, vlen - 1, num_frames, dtype=int)
  raise ValueError(f"unknown sampling {sampling!r}; expected 'uniform', 'headtail' or 'linspace'")


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


def short_side_crop(pixels: np.ndarray, size: int) -> np.ndarray:
  """Video-LLaVA's spatial transform (see the module doc): short side to `size`, centre crop.

  pixels: [T, H, W, 3] uint8 -> [T, size, size, 3] float32 on the 0-255 scale. Only the rows
  and columns that survive the crop are interpolated. Normalising before or after is the same
  up to float rounding: bilinear weights sum to 1.
  """
  height, width = pixels.shape[1:3]
  if width < height:
    out_h, out_w = math.floor(height / width * size), size
  else:
    out_h, out_w = size, math.floor(width / height * size)
  # Python's round, as torchvision: a .5 offset goes to the even side.
  top, left = round((out_h - size) / 2.0), round((out_w - size) / 2.0)
  r0, r1, a0, a1 = _bilinear_taps(height, out_h, top, size)
  c0, c1, b0, b1 = _bilinear_taps(width, out_w, left, size)
  rows = pixels[:, r0] * a0[:, None, None] + pixels[:, r1] * a1[:, None, None]
  return rows[:, :, c0] * b0[:, None] + rows[:, :, c1] * b1[:, None]


def _bilinear_taps(in_size: int, out_size: int, start: int, count: int):
  """Source indices and float32 weights of outputs start..start+count-1 when an axis of
  `in_size` is resized to `out_size` the way torch's bilinear interpolate does it."""
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(start, start + count, dtype=np.float32) + np.float32(0.5)
  # scale * dst - 0.5 rounded once to float32, as torch's kernel computes it (a fused
  # multiply-add; the float64 product is exact). Float64 coordinates move 1080p outputs by 4e-4.
  src = np.maximum((np.float64(scale) * dst - 0.5).astype(np.float32), 0)
  i0 = src.astype(int)
  w1 = src - np.floor(src)
  return i0, np.minimum(i0 + 1, in_size - 1), 1 - w1, w1


def _clip_image_resize(image, size: int) -> np.ndarray:
  """PIL RGB image -> [size, size, 3] uint8, as CLIPImageProcessor resizes and crops."""
  from PIL import Image
  width, height = image.size
  long = int(size * max(width, height) / min(width, height))
  new_w, new_h = (size, long) if width <= height else (long, size)
  pixels = np.asarray(image.resize((new_w, new_h), Image.BICUBIC))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return pixels[top:top + size, left:left + size]


def image_resize(aspect_ratio: str) -> str:
  """The `resize` of training images for a recipe's data.image_aspect_ratio: "square" (the
  reference's default: CLIPImageProcessor's resize and centre crop) or "pad" (padded to a square
  first)."""
  if aspect_ratio not in ASPECT_RATIOS:
    raise ValueError(f"unknown data.image_aspect_ratio {aspect_ratio!r}; expected one of {', '.join(ASPECT_RATIOS)}")
  return "pad" if aspect_ratio == "pad" else "short_side_crop"


def expand_to_square(image, color: tuple[int, ...] = PAD_COLOR):
  """A PIL image pasted centred on a square canvas of `color` (its longer side), as LLaVA's
  expand2square pads; a square image is returned as it is."""
  from PIL import Image
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  square = Image.new(image.mode, (side, side), color)
  square.paste(image, ((side - width) // 2, (side - height) // 2))
  return square


def _to_rgb(image):
  """A PIL image of any mode -> 8-bit RGB. PIL's own convert clips 16-bit and float values to
  0..255 (a 16-bit picture turns white) and drops alpha instead of compositing it."""
  from PIL import Image
  if image.mode.startswith("I"):  # "I;16", "I;16B", ... and "I", which older PIL gives 16-bit pngs
    image = Image.fromarray((np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8))
  elif image.mode == "F":  # no stated range: 0..1 when no value exceeds 1, else 0..255
    values = np.asarray(image)
    values = values * 255 if values.max() <= 1 else values
    image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
  return image.convert("RGB")


def _check_resize(resize: str, modes: tuple[str, ...] = RESIZE_MODES) -> None:
  if resize not in modes:
    raise ValueError(f"unknown resize {resize!r}; expected one of {modes}")


def load_video(path: str, num_frames: int = 8, size: int = 224, sampling: str = "uniform",
               rng: np.random.Generator | None = None, train_crop: bool = False,
               num_threads: int = 2, resize: str = "squash", bounds: tuple[float, float] | None = None,
               folder_fps: float | None = None) -> Frames:
  """Decode `num_frames` sampled frames of a video file (or, with `folder_fps`, a folder of frame
  images), only those within `bounds` seconds when given; see the module doc.

  `train_crop` applies the training RandomResizedCrop (scale 0.5-1, bicubic) to the decoded
  frames, in place of the `resize` step. `num_threads` are the decoder's threads for this
  reader (keep it small when several readers run in parallel). `path` may be a URL (gs://...).
  Raises FileNotFoundError, MediaError, or `paths.StorageError` when its store cannot be reached.
  """
  _check_resize(resize)
  decode_size = dict(width=size, height=size) if resize == "squash" else {}
  path = paths.resolve(path)
  reader = _open(path, folder_fps, num_threads=num_threads, **decode_size)
  vlen, fps = len(reader), float(reader.get_avg_fps())
  fps = fps if fps > 0 else 1.0
  first, last = frame_window(path, vlen, fps, bounds)
  indices = first + sample_indices(last - first + 1, num_frames, sampling, rng)
  pixels = _decode(reader, path, indices)  # [n, H, W, 3] uint8
  if train_crop:
    pixels = random_resized_crop(pixels, size, rng or np.random.default_rng())
  elif resize == "short_side_crop":
    pixels = short_side_crop(pixels, size)
  frames, mask = pad_frames(normalize(pixels), num_frames)
  return Frames(frames, mask, [round(float(i) / fps, 1) for i in indices])


def frame_window(path: str, vlen: int, fps: float, bounds: tuple[float, float] | None) -> tuple[int, int]:
  """The first and last of a video's `vlen` frames within `bounds` = (start, end) seconds (all of
  them when None); MediaError when none is."""
  if bounds is None:
    return 0, vlen - 1
  start, end = bounds
  # The tolerance keeps a bound that falls on a frame (0.3 s at 10 fps) from losing it to rounding.
  first = max(0, math.ceil(start * fps - 1e-6))
  last = min(vlen - 1, math.floor(end * fps + 1e-6))
  if first > last:
    raise MediaError(f"{path} has no frame within {start:g}-{end:g} s ({vlen} frames at {fps:g} fps)")
  return first, last


class FrameFolder:
  """A folder of frame images read as a video at `fps` frames per second, in name order (zero-padded
  numbers, as frame extractors write them): in place of decord's reader for `load_video` and
  `FrameStream`. `width` and `height`: each frame resized to them (bicubic), as decord resizes."""

  def __init__(self, path: str, fps: float, width: int | None = None, height: int | None = None):
    if not paths.is_dir(path):
      raise FileNotFoundError(f"frame folder not found: {path}")
    self.path, self.fps, self.size = path, fps, (width, height) if width and height else None
    self.names = [name for name in paths.listdir(path) if is_image_path(name)]
    if not self.names:
      raise MediaError(f"{path} holds no frame images ({', '.join(IMAGE_EXTENSIONS)})")

  def __len__(self) -> int:
    return len(self.names)

  def get_avg_fps(self) -> float:
    return self.fps

  def get_batch(self, indices) -> np.ndarray:
    """The frames at `indices` -> [n, H, W, 3] uint8."""
    from PIL import Image, UnidentifiedImageError
    frames = []
    for index in indices:
      file = paths.join(self.path, self.names[index])
      try:
        with Image.open(paths.media_source(file)) as image:
          image = _to_rgb(image)
          frames.append(np.asarray(image.resize(self.size, Image.BICUBIC) if self.size else image))
      except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"cannot decode frame {file}: {e}") from e
    if len({f.shape for f in frames}) > 1:
      raise MediaError(f"the frames in {self.path} differ in size")
    return np.stack(frames)


def _open(path: str, folder_fps: float | None = None, **kwargs):
  """A reader of a video with frames: an H264Reader (a local H.264 mp4) or a decord VideoReader
  (a stored object's decoded from its bytes in memory), or with `folder_fps` a FrameFolder;
  MediaError (naming the file) otherwise."""
  if folder_fps is not None:
    return FrameFolder(path, folder_fps, kwargs.get("width"), kwargs.get("height"))
  source = paths.media_source(path)
  if isinstance(source, str):
    reader = H264Reader.open(source, **kwargs)
    if reader is not None:
      return reader
  return _open_decord(path, source, **kwargs)


def _open_decord(path: str, source, **kwargs):
  import decord
  try:
    reader = decord.VideoReader(source, **kwargs)
  except (decord.DECORDError, RuntimeError) as e:  # decord raises RuntimeError on open
    if _has_audio_only(source):
      raise MediaError(f"{path} has no video stream (an audio-only file?)") from e
    raise MediaError(f"cannot decode video {path}: {str(e).splitlines()[0]}") from e
  if len(reader) == 0:
    raise MediaError(f"{path} has no video frames")
  return reader


def _decode(reader, path: str, indices) -> np.ndarray:
  """The frames at `indices` -> [n, H, W, 3] uint8; MediaError on a decoding failure."""
  if isinstance(reader, (FrameFolder, H264Reader)):
    return reader.get_batch(indices)
  import decord
  try:
    return reader.get_batch(list(map(int, indices))).asnumpy()
  except (decord.DECORDError, RuntimeError) as e:
    raise MediaError(f"cannot decode video {path}: {str(e).splitlines()[0]}") from e


class H264Reader:
  """A local H.264 mp4 read as decord's VideoReader reads it (`len`, `get_avg_fps`, `get_batch`:
  the same frames, bit for bit; `width` and `height` resize them as decord does), with less
  decoding (see the module doc). `open` reads the packets once: timestamps, keyframes, and
  whether each picture is referenced; `get_batch` then decodes each sampled frame from the last
  keyframe before it, or on from the previous sampled frame when that is nearer, passing over
  unreferenced pictures that are not sampled."""

  def __init__(self, path: str, pts: np.ndarray, keyframe: np.ndarray, referenced: np.ndarray, fps: float,
               width: int | None, height: int | None, num_threads: int):
    self.path, self.pts, self.referenced, self.fps = path, pts, referenced, fps
    self.size, self.num_threads = (width, height), num_threads
    self.order = np.argsort(pts, kind="stable")  # presentation index -> decode position
    self.sorted_pts = pts[self.order]
    self.keyframes = np.flatnonzero(keyframe)

  @classmethod
  def open(cls, path: str, width: int | None = None, height: int | None = None,
           num_threads: int = 0) -> "H264Reader | None":
    """The reader of a local file, or None when this reader does not read it (no video, another
    codec, Annex B streams, packets without timestamps, no frame rate): decord reads those."""
    import av
    try:
      with av.open(path) as container:
        if not container.streams.video:
          return None
        stream = container.streams.video[0]
        length_size = _avc_length_size(stream.codec_context)
        if length_size is None or not stream.average_rate:
          return None
        pts, keyframe, referenced = [], [], []
        for packet in container.demux(stream):
          if packet.size:
            if packet.pts is None:
              return None
            pts.append(packet.pts)
            keyframe.append(packet.is_keyframe)
            referenced.append(_is_referenced(memoryview(packet), length_size))
        if not pts or len(set(pts)) != len(pts) or stream.frames not in (0, len(pts)) or not keyframe[0]:
          return None
        fps = float(stream.average_rate)
    except (av.FFmpegError, OSError, ValueError):
      return None
    return cls(path, np.array(pts), np.array(keyframe), np.array(referenced), fps, width, height, num_threads)

  def __len__(self) -> int:
    return len(self.pts)

  def get_avg_fps(self) -> float:
    return self.fps

  def get_batch(self, indices) -> np.ndarray:
    """The frames at `indices` (presentation order) -> [n, H, W, 3] uint8; decord's when this
    reader cannot decode them."""
    indices = [int(i) for i in indices]
    frames = self._decode(indices)
    if frames is None:
      size = dict(width=self.size[0], height=self.size[1]) if all(self.size) else {}
      return _decode(_open_decord(self.path, self.path, num_threads=self.num_threads, **size), self.path, indices)
    return frames

  def _decode(self, indices: list[int]) -> np.ndarray | None:
    import av
    pts = self.pts
    wanted = {int(pts[self.order[i]]) for i in indices}
    got, at = {}, None  # at: decode position of the last packet read
    try:
      with av.open(self.path) as container:
        stream = container.streams.video[0]
        codec, packets = stream.codec_context, None
        codec.thread_count = self.num_threads
        convert = _rgb_converter(*self.size, stream.time_base)
        for target in sorted({int(self.order[i]) for i in indices}):
          # The last keyframe at or before the target in decode order that is not shown after it
          # (an open GOP's leading pictures need the keyframe before).
          starts = self.keyframes[(self.keyframes <= target) & (pts[self.keyframes] <= pts[target])]
          if not len(starts):
            return None
          if at is None or starts[-1] > at:
            container.seek(int(pts[starts[-1]]), stream=stream, backward=True)
            codec.flush_buffers()
            packets = container.demux(stream)
          while int(pts[target]) not in got:
            packet = next(packets, None)
            if packet is None or not packet.size:  # the end: drain the decoder's delayed frames
              frames = codec.decode(None)
            else:
              at = self._position(packet.pts)
              if at is None:
                return None
              if not self.referenced[at] and packet.pts not in wanted:
                continue
              frames = codec.decode(packet)
            got.update((f.pts, convert(f)) for f in frames if f.pts in wanted and f.pts not in got)
            if packet is None and int(pts[target]) not in got:
              return None
    except (av.FFmpegError, OSError, ValueError):
      return None
    return np.stack([got[int(pts[self.order[i]])] for i in indices])

  def _position(self, pts: int | None) -> int | None:
    """The decode position of the packet with timestamp `pts` (None: no such packet)."""
    i = int(np.searchsorted(self.sorted_pts, pts)) if pts is not None else len(self.pts)
    return int(self.order[i]) if i < len(self.pts) and self.sorted_pts[i] == pts else None


def _avc_length_size(codec) -> int | None:
  """The bytes of each NAL unit's length prefix in an H.264 stream's packets (mp4's avcC
  extradata); None for any other stream."""
  extra = codec.extradata
  if codec.name != "h264" or not extra or len(extra) < 5 or extra[0] != 1:
    return None
  return (extra[4] & 3) + 1


def _is_referenced(data: memoryview, length_size: int) -> bool:
  """Whether an H.264 access unit (length-prefixed NAL units) holds a picture that others may
  reference: a slice NAL unit (types 1-5) with nal_ref_idc > 0, or none found (kept, to be safe)."""
  at, slices = 0, 0
  while at + length_size < len(data):
    size = int.from_bytes(data[at:at + length_size], "big")
    header = data[at + length_size]
    if 1 <= header & 0x1F <= 5:
      slices += 1
      if header & 0x60:
        return True
    at += length_size + size
  return slices == 0


def _rgb_converter(width: int | None, height: int | None, time_base):
  """A decoded frame (of a stream with `time_base`) -> [H, W, 3] uint8 RGB, resized to `width` x
  `height` when given with FFmpeg's scale filter (bilinear, in YUV, then converted), as decord resizes."""
  if not (width and height):
    return lambda frame: frame.to_ndarray(format="rgb24")
  import av
  graphs = {}

  def convert(frame):
    key = (frame.width, frame.height, frame.format.name)
    if key not in graphs:
      graph = av.filter.Graph()
      source = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                                time_base=time_base)
      scale = graph.add("scale", f"{width}:{height}:flags=bilinear")
      rgb, sink = graph.add("format", "rgb24"), graph.add("buffersink")
      source.link_to(scale)
      scale.link_to(rgb)
      rgb.link_to(sink)
      graph.configure()
      graphs[key] = graph
    graphs[key].push(frame)
    return graphs[key].pull().to_ndarray()
  return convert


class FrameStream:
  """A video's frames at `fps` per second (at most `max_frames`, evenly spread; within `bounds`
  seconds when given; `folder_fps`: a folder of frames, see the module doc), decoded a chunk at a
  time, each frame resized and centre-cropped as CLIPImageProcessor does (LLaMA-VID): an hour-long
  video never sits in memory whole."""

  def __init__(self, path: str, fps: float = 1.0, max_frames: int | None = None,
               bounds: tuple[float, float] | None = None, folder_fps: float | None = None):
    self.path = paths.resolve(path)
    self.reader = _open(self.path, folder_fps, num_threads=2)
    self.video_fps = float(self.reader.get_avg_fps()) or 1.0
    first, last = frame_window(self.path, len(self.reader), self.video_fps, bounds)
    self.indices = np.arange(first, last + 1, max(1, round(self.video_fps / fps)))
    if max_frames and len(self.indices) > max_frames:
      self.indices = self.indices[np.linspace(0, len(self.indices) - 1, max_frames).astype(int)]
    self.timestamps = [round(float(i) / self.video_fps, 1) for i in self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def chunks(self, size: int, image_size: int = 224):
    """Yields the frames [<= size, image_size, image_size, 3] float32, normalised, in order."""
    for start in range(0, len(self.indices), size):
      yield self.frames(np.arange(start, min(start + size, len(self.indices))), image_size)

  def frames(self, positions, image_size: int = 224) -> np.ndarray:
    """The stream's frames at `positions` (indices into it) [N, image_size, image_size, 3]."""
    return normalize(self.pixels(positions, image_size))

  def pixels(self, positions, image_size: int = 224) -> np.ndarray:
    """`frames` before normalising: [N, image_size, image_size, 3] uint8."""
    from PIL import Image
    pixels = _decode(self.reader, self.path, self.indices[positions])
    return np.stack([_clip_image_resize(Image.fromarray(p), image_size) for p in pixels])


def _has_audio_only(source) -> bool:
  """Whether a file (a path or `paths.media_source`'s bytes) decord could not open is a readable
  container with audio but no video."""
  import av
  if isinstance(source, io.BytesIO):
    source.seek(0)  # decord read it to the end
  try:
    with av.open(source) as container:
      return bool(container.streams.audio) and not container.streams.video
  except (av.FFmpegError, OSError, ValueError):
    return False


def load_image(path: str, num_frames: int = 1, size: int = 224, resize: str = "squash") -> Frames:
  """An image file as a one-frame video (padded to `num_frames` masked frames if > 1); `resize`:
  one of IMAGE_RESIZE_MODES (see the module doc)."""
  frames, mask = pad_frames(normalize(image_pixels(path, size, resize))[None], num_frames)
  return Frames(frames, mask, [0.0], is_image=True)


def image_pixels(path: str, size: int = 224, resize: str = "squash") -> np.ndarray:
  """`load_image`'s frame before normalising: [size, size, 3] uint8."""
  from PIL import Image, UnidentifiedImageError
  _check_resize(resize, IMAGE_RESIZE_MODES)
  path = paths.resolve(path)
  source = paths.media_source(path)
  try:
    with Image.open(source) as image:
      image = _to_rgb(image)
      if resize == "squash":
        pixels = np.asarray(image.resize((size, size), Image.BICUBIC))
      else:
        pixels = _clip_image_resize(expand_to_square(image) if resize == "pad" else image, size)
  except (UnidentifiedImageError, OSError) as e:
    raise MediaError(f"cannot decode image {path}: {e}") from e
  return pixels


def is_image_path(path: str) -> bool:
  """By the extension (local paths and URLs alike)."""
  stem, dot, ext = str(path).rpartition("/")[2].rpartition(".")
  return bool(stem and dot) and f".{ext.lower()}" in IMAGE_EXTENSIONS


def load_visual(path: str, num_frames: int = 8, size: int = 224, resize: str = "squash",
                **kwargs) -> Frames:
  """A video, a frame folder (`folder_fps`) or (by extension) an image file -> Frames; `kwargs` go
  to `load_video` only."""
  if is_image_path(path):
    return load_image(path, num_frames, size, resize)
  return load_video(path, num_frames, size, resize=resize, **kwargs)
