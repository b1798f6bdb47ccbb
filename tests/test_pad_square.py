"""Images padded to a square (`resize="pad"`, the recipes' `data.image_aspect_ratio: pad`) against
a PIL construction of the LLaVA family's expand2square and transformers' CLIPImageProcessor, and
the recipes and example builders that use it."""

import os

import numpy as np
import pytest
from PIL import Image
from test_video_loading import write_video
from transformers import CLIPImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vllm_jax.cli.flags import load_config
from vllm_jax.data import video as V
from vllm_jax.data.tokenizer import train_tokenizer
from vllm_jax.systems import llama_vid, video_llava

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LLaMA-VID's processor/clip-patch14-224 (and Video-LLaVA's image mean): shortest edge 224, crop 224, bicubic.
PROCESSOR = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size=224, resample=3,
                                  image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)


def reference_pad(image: Image.Image, color) -> Image.Image:
  """The reference's padding, built here: a canvas of the longer side in `color`, the image on it
  at ((side - width) // 2, (side - height) // 2)."""
  side = max(image.size)
  canvas = Image.new(image.mode, (side, side), color)
  canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
  return canvas


def write_image(path, size, seed=0) -> str:
  """A noisy RGB png of (height, width) `size` with a bright border, which the padding keeps whole."""
  pixels = np.random.default_rng(seed).integers(0, 200, (*size, 3), np.uint8)
  pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1] = 255, 255, 255, 255
  Image.fromarray(pixels).save(path)
  return str(path)


def test_pad_colour_is_the_processor_mean():
  assert V.PAD_COLOR == tuple(int(x * 255) for x in PROCESSOR.image_mean) == (122, 116, 104)


# (height, width): landscape, portrait, an odd margin (13 columns: 6 left, 7 right), square, and
# one larger than 224.
@pytest.mark.parametrize("size", [(30, 44), (50, 31), (44, 31), (40, 40), (300, 420)])
def test_pad_matches_expand2square_and_clip_image_processor(tmp_path, size):
  path = write_image(tmp_path / "img.png", size)
  with Image.open(path) as image:
    padded = reference_pad(image.convert("RGB"), tuple(int(x * 255) for x in PROCESSOR.image_mean))
    expected = PROCESSOR(padded, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  out = V.load_image(path, resize="pad")
  assert out.is_image and out.frames.shape == (1, 224, 224, 3)
  np.testing.assert_allclose(out.frames[0], expected, rtol=0, atol=1e-4)
  cropped = V.load_image(path, resize="short_side_crop").frames[0]
  assert (size[0] == size[1]) == np.allclose(out.frames[0], cropped, atol=1e-4)


def test_pad_is_for_images():
  with pytest.raises(ValueError, match="unknown resize 'pad'"):
    V.load_video("clip.mp4", resize="pad")
  assert V.image_resize("pad") == "pad" and V.image_resize("square") == "short_side_crop"
  with pytest.raises(ValueError, match="unknown data.image_aspect_ratio 'letterbox'"):
    V.image_resize("letterbox")


def recipe(name: str):
  return load_config(os.path.join(ROOT, f"configs/{name}"), [])


def test_recipes_pad_where_the_references_do():
  """Video-LLaVA's finetune scripts and LLaMA-VID's stage-2 and stage-3 scripts pad; their first
  stages do not."""
  aspect = lambda name: recipe(name).data.image_aspect_ratio
  assert [aspect(f"video_llava.py:{s}") for s in ("stage1", "stage2", "stage2_lora")] == ["square", "pad", "pad"]
  assert [aspect(f"llama_vid.py:{s}") for s in ("stage1", "stage2", "stage3", "stage2_lora")] == [
      "square", "pad", "pad", "pad"]


def test_example_builders_pad_images_only(tmp_path):
  """A recipe with pad: the image in frame 0 of both systems' examples is the padded one; a video's
  frames are not padded (the references pad images only)."""
  image = write_image(tmp_path / "img.png", (30, 44))
  padded = V.load_image(image, size=28, resize="pad").frames[0]
  assert not np.allclose(padded, V.load_image(image, size=28, resize="short_side_crop").frames[0], atol=1e-3)

  cfg = recipe("llama_vid.py:tiny_stage2")
  decode = llama_vid.Decode("", "", "conversation", 64, 64, 4, 1, 8, 28, 1.0, 300, 2,
                            image_resize=V.image_resize(cfg.data.image_aspect_ratio))
  pixels, n = decode.frames({"kind": "image", "media": image})  # uint8, normalised on the device
  assert n == 1 and np.array_equal(V.normalize(pixels[0]), padded) and not pixels[1:].any()

  tokenizer = train_tokenizer(["What is shown? A picture of noise."] * 20, str(tmp_path / "tokenizer"), 280)
  image_id, video_id = video_llava.VideoLlavaSystem.add_media_tokens(tokenizer)
  tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
  cfg = recipe("video_llava.py:tiny_stage2")
  decode = video_llava.Decode(str(tmp_path / "tokenizer"), 256, 320, 2, 28, image_id, video_id, 4, 10,
                              image_resize=V.image_resize(cfg.data.image_aspect_ratio))
  conversation = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "Noise."}]
  example = decode({"kind": "image", "media": image, "conversation": conversation})
  assert np.array_equal(example["pixels"][0], padded)
  video = write_video(tmp_path / "clip.mp4", num_frames=6, size=(24, 40))
  example = decode({"kind": "video", "media": video, "conversation": conversation})
  np.testing.assert_array_equal(example["pixels"], V.load_video(video, 2, 28, **video_llava.PREPROCESS).frames)
