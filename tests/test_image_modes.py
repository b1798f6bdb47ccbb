"""Images of every PIL mode load as the 8-bit RGB picture they show: each file, written with
PIL, is compared with that picture saved as a plain RGB png and loaded the same way."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vllm_jax.data import video as V
from vllm_jax.data.media import load_media

PALETTE = np.random.default_rng(0).integers(0, 256, (16, 3), np.uint8)


def levels(path, resize="squash", size=224):
  """The loaded frame on the 0-255 scale (normalisation undone)."""
  return (V.load_visual(str(path), resize=resize, size=size).frames[0] * V.CLIP_STD + V.CLIP_MEAN) * 255


def to16(pixels, rng):
  """8-bit levels v as 16-bit ones that mean v under either reading (>> 8, or / 257 rounded)."""
  extra = np.minimum(rng.integers(0, 128, pixels.shape), 255 - pixels)
  return (pixels.astype(np.uint16) * 257 + extra).astype(np.uint16)


def over_white(rgb, alpha):
  a = alpha[..., None] / 255.0
  return np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)


def palette_image(index, alpha=None):
  mode, data = ("P", index) if alpha is None else ("PA", np.stack([index, alpha], -1))
  image = Image.frombytes(mode, index.shape[::-1], data.tobytes())
  image.putpalette(PALETTE.tobytes())
  return image


def write_png16(path, pixels):
  """A 48-bit RGB png, which PIL cannot write."""
  rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
  chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 16, 2, 0, 0, 0)
  body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
  return path


def ycbcr_to_rgb(ycc):
  """ITU-R BT.601 full range, as JPEG (and PIL) define YCbCr."""
  y, cb, cr = np.moveaxis(ycc.astype(np.float64), -1, 0)
  cb, cr = cb - 128, cr - 128
  rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
  return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def write_case(case, folder, shape):
  """-> (a file in that mode, the 8-bit RGB picture it shows, the modes PIL may open it in)."""
  height, width = shape
  rng = np.random.default_rng(1)
  # Levels 20..200: clipping to white, or stretching the values' min..max, would both show.
  gray = np.clip(np.linspace(20, 200, width)[None] + rng.integers(-20, 21, shape), 20, 200).astype(np.uint8)
  gray3 = np.repeat(gray[..., None], 3, -1)
  rgb = np.stack([gray, gray[::-1], gray[:, ::-1]], -1)
  alpha = rng.integers(0, 256, shape, np.uint8)
  index = rng.integers(0, len(PALETTE), shape, np.uint8)
  png, tif = folder / "image.png", folder / "image.tif"
  if case == "I;16":
    return save(Image.fromarray(to16(gray, rng)), png), gray3, ("I;16", "I")
  if case == "I;16B":
    return save(Image.fromarray(to16(gray, rng).astype(">u2")), tif), gray3, ("I;16B",)
  if case == "I":
    return save(Image.fromarray(to16(gray, rng).astype(np.int32)), tif), gray3, ("I",)
  if case == "F 0..1":
    return save(Image.fromarray(gray / np.float32(255)), tif), gray3, ("F",)
  if case == "F 0..255":
    return save(Image.fromarray(gray.astype(np.float32)), tif), gray3, ("F",)
  if case == "RGB 16-bit":
    return write_png16(png, to16(rgb, rng)), rgb, ("RGB",)
  if case == "RGB":
    return save(Image.fromarray(rgb), png), rgb, ("RGB",)
  if case == "L":
    return save(Image.fromarray(gray), png), gray3, ("L",)
  if case == "1":
    bits = (gray > 110).astype(np.uint8) * 255
    return save(Image.fromarray(bits).convert("1"), png), np.repeat(bits[..., None], 3, -1), ("1",)
  if case == "P":
    return save(palette_image(index), png), PALETTE[index], ("P",)
  if case == "P transparency":  # an alpha per palette entry (png tRNS)
    entry_alpha = rng.integers(0, 256, len(PALETTE), np.uint8)
    palette_image(index).save(png, transparency=entry_alpha.tobytes())
    return png, over_white(PALETTE[index], entry_alpha[index]), ("P",)
  if case == "PA":
    return save(palette_image(index, alpha), tif), over_white(PALETTE[index], alpha), ("PA",)
  if case == "LA":
    return save(Image.fromarray(np.stack([gray, alpha], -1)), png), over_white(gray3, alpha), ("LA",)
  if case == "RGBA":
    return save(Image.fromarray(np.dstack([rgb, alpha])), png), over_white(rgb, alpha), ("RGBA",)
  if case == "CMYK":
    cmyk = rng.integers(0, 256, (*shape, 4), np.uint8)
    expected = np.round((255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255).astype(np.uint8)
    return save(Image.frombytes("CMYK", (width, height), cmyk.tobytes()), tif), expected, ("CMYK",)
  if case == "YCbCr":
    ycc = rng.integers(0, 256, (*shape, 3), np.uint8)
    save(Image.frombytes("YCbCr", (width, height), ycc.tobytes()), tif)
    try:
      with Image.open(tif) as image:
        image.load()
    except OSError:  # Pillow 12 writes a YCbCr TIFF it cannot read back ("image file is truncated")
      pytest.skip("this Pillow cannot read the YCbCr TIFF it writes")
    return tif, ycbcr_to_rgb(ycc), ("YCbCr",)
  raise ValueError(case)


def save(image, path):
  image.save(path)
  return path


CASES = ["I;16", "I;16B", "I", "F 0..1", "F 0..255", "RGB 16-bit", "RGB", "L", "1", "P", "P transparency", "PA",
         "LA", "RGBA", "CMYK", "YCbCr"]


def loaded_error(case, folder, shape, resize, size):
  """Max level difference between the file in that mode and its RGB picture as a plain png."""
  path, rgb, modes = write_case(case, folder, shape)
  with Image.open(path) as image:
    assert image.mode in modes
  expected = save(Image.fromarray(rgb), folder / "expected.png")
  return np.abs(levels(path, resize, size) - levels(expected, resize, size)).max()


@pytest.mark.parametrize("resize", V.RESIZE_MODES)
@pytest.mark.parametrize("case", CASES)
def test_every_mode_converts_to_its_rgb_picture(tmp_path, case, resize):
  """At the native size (both resizes are then the identity): the conversion itself."""
  assert loaded_error(case, tmp_path, (32, 32), resize, 32) <= 1 + 1e-3


# YCbCr is left out: PIL's fixed-point conversion is a level off the exact one on a third of
# the pixels, which bicubic upsampling can grow to 3.
@pytest.mark.parametrize("resize", V.RESIZE_MODES)
@pytest.mark.parametrize("case", [case for case in CASES if case != "YCbCr"])
def test_both_resizes_see_the_converted_picture(tmp_path, case, resize):
  assert loaded_error(case, tmp_path, (30, 40), resize, 224) <= 1e-3


def test_full_16_bit_range_is_scaled_not_clipped(tmp_path):
  """Every 16-bit level, at the native size."""
  values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
  path = save(Image.fromarray(values), tmp_path / "ramp.png")
  expected = np.repeat(np.round(values / 257)[..., None], 3, -1)
  np.testing.assert_allclose(levels(path, size=256), expected, rtol=0, atol=1 + 1e-3)


@pytest.mark.parametrize("ext", ["gif", "webp", "png"])
def test_animated_image_is_its_first_frame(tmp_path, ext):
  index = np.random.default_rng(1).integers(0, len(PALETTE), (30, 40), np.uint8)
  frames = [palette_image(np.roll(index, 7 * k, 1)) for k in range(3)]
  if ext != "gif":  # animated webp (lossless) and apng take RGB frames
    frames = [frame.convert("RGB") for frame in frames]
  path = tmp_path / f"anim.{ext}"
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
  with Image.open(path) as image:
    assert image.n_frames == 3
  out = V.load_visual(str(path), num_frames=8)
  assert out.is_image and out.frame_mask.tolist() == [True] + [False] * 7
  assert load_media(str(path), with_audio=True).audio is None
  first, second = (save(frame.convert("RGB"), tmp_path / f"frame{k}.png") for k, frame in enumerate(frames[:2]))
  assert np.abs(levels(path) - levels(first)).max() <= 1e-3
  assert np.abs(levels(path) - levels(second)).max() > 50


def test_transparency_matches_clip_image_processor(tmp_path):
  """An RGBA image through Video-LLaVA's path is what CLIPImageProcessor makes of it: over white."""
  path, _, _ = write_case("RGBA", tmp_path, (30, 40))
  processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size=224, image_mean=OPENAI_CLIP_MEAN,
                                    image_std=OPENAI_CLIP_STD)
  with Image.open(path) as image:
    expected = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(V.load_image(str(path), resize="short_side_crop").frames[0], expected, rtol=0, atol=1e-4)
