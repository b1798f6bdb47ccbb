"""Video-LLaVA as a system: 8 frames by linspace, short side resized to 224 and centre-cropped
(images as CLIPImageProcessor does), the image and video towers with the shared projector, the
llava_v1 template with `<image>` (256 tokens) / `<video>` (8 x 257), and training examples from
LLaVA-style conversation JSON mixing images, videos and text-only conversations.

A training example (fixed shapes, so that batches stack and the step compiles once):
  pixels [T, S, S, 3] float32: a video's T frames, or an image in frame 0 (the rest copies;
    padded to a square first with `data.image_aspect_ratio` "pad", `video.image_resize`), or
    zeros for a text-only record (whose text has no media turn);
  input_ids, labels, attention_mask [L] int32, right-padded, labels -100 where nothing is learned.
The text is the llava_v1 training format with the media turn ("<image>\\n" or "<video>\\n") opening
the first question, cut at `data.max_text_len` tokens with each placeholder counted once (the
reference's model_max_length), then expanded; L = `data.max_len` (its tokenizer_model_max_length)
bounds the expanded sequence. Batches hold only images, only videos or only text (the
reference's group_by_modality_length keeps text apart), so each training step runs at most one tower.
With `data.feature_cache` (`vllm-jax cache-features`, `vllm_jax.data.feature_cache`) the frozen
towers' outputs replace the pixels: features [T, 1+G*G, D] in the towers' compute dtype (bfloat16
in the full-size recipes: exact, half of float32's bytes), a video's video-tower features
or an image's image-tower patch features in frame 0 (after its CLS slot), zeros otherwise; the
towers then stay off the devices.
"""

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax.data import conversation as conv_lib
from vllm_jax.data import feature_cache
from vllm_jax.data import video as video_lib
from vllm_jax.data.media import Media, load_media
from vllm_jax.models.video_llava import VideoLlava, VideoLlavaConfig, abstract_params, init_inputs
from vllm_jax.systems.base import System, apply, instruction_groups, instruction_sources, llm_loss
from vllm_jax.train import trainer

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
PREPROCESS = dict(sampling="linspace", resize="short_side_crop")
TOWERS = ("image_tower/", "video_tower/")


class VideoLlavaSystem(System):
  model_type = "video_llava"
  config_class = VideoLlavaConfig
  module = VideoLlava
  abstract_params = staticmethod(abstract_params)
  init_inputs = staticmethod(init_inputs)
  placeholder_tokens = (IMAGE_TOKEN, VIDEO_TOKEN)
  placeholder_fields = ("image_token_id", "video_token_id")

  def load_media(self, path, use_audio=False, num_frames=None, bounds=None, folder_fps=None):
    del use_audio  # no audio branch
    cfg = self.config
    if num_frames not in (None, cfg.num_frames):
      raise ValueError(f"Video-LLaVA reads {cfg.num_frames} frames per video (the prompt holds their tokens)")
    return load_media(path, cfg.num_frames, cfg.video_tower.image_size, bounds=bounds, folder_fps=folder_fps,
                      **PREPROCESS)

  def conversation(self, media, use_audio=False):
    return conv_lib.Conversation(self.template).open_with((IMAGE_TOKEN if media.is_image else VIDEO_TOKEN) + "\n")

  def placeholders(self, media):
    del media  # the same runs for every item
    cfg = self.config
    return {IMAGE_TOKEN: (cfg.image_token_id, cfg.num_image_tokens),
            VIDEO_TOKEN: (cfg.video_token_id, cfg.num_video_tokens)}

  def encode_media(self, media: Sequence[Media], use_audio=False):
    """Images [B, 256, E] when a row is an image, videos [B, T*257, E] when a row is a video
    (each row uses the kind its prompt asks for)."""
    model = VideoLlava(self.config)
    pixels = np.stack([m.frames.frames for m in media])
    images = apply(model, "encode_images", self.params, pixels[:, 0]) if any(m.is_image for m in media) else None
    videos = apply(model, "encode_videos", self.params, pixels) if not all(m.is_image for m in media) else None
    return images, videos

  def embed(self, input_ids, tokens, conversations):
    del conversations  # the tokens do not depend on the text
    return apply(VideoLlava(self.config), "embed", self.params, np.asarray(input_ids), *tokens)

  # --- training -----------------------------------------------------------------------------

  @classmethod
  def loss_fn(cls, config) -> trainer.LossFn:
    """Each tower runs only when some row of the batch asks for its tokens (a batch drawn from
    one media group, see `dataset`, runs one tower)."""
    model = VideoLlava(config)

    def loss(params, batch, rng):
      ids = batch["input_ids"]
      if "features" in batch:  # a feature cache's batch: the towers ran when it was made
        features = batch["features"]
        images, videos = features[:, 0, 1:], features
        methods = ("encode_image_features", "encode_video_features")
      else:
        images, videos = batch["pixels"][:, 0], batch["pixels"]
        methods = ("encode_images", "encode_videos")

      def tokens_if_asked(method, token_id, inputs):
        encode = lambda: model.apply({"params": params}, inputs, method=method)
        nothing = lambda: jnp.zeros_like(jax.eval_shape(encode))
        return jax.lax.cond(jnp.any(ids == token_id), encode, nothing)

      embeds = model.apply({"params": params}, ids, tokens_if_asked(methods[0], config.image_token_id, images),
                           tokens_if_asked(methods[1], config.video_token_id, videos), method="embed")
      return llm_loss(config.llama, params, embeds, batch, rng)
    return loss

  @classmethod
  def decoder(cls, cfg, config, tokenizer_dir) -> "Decode":
    """The training example builder: a record -> an example (see the module doc)."""
    return Decode(tokenizer_dir=tokenizer_dir, max_text_len=cfg.data.max_text_len, max_len=cfg.data.max_len,
                  num_frames=config.num_frames, image_size=config.video_tower.image_size,
                  image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                  num_image_tokens=config.num_image_tokens, num_video_tokens=config.num_video_tokens,
                  image_resize=video_lib.image_resize(cfg.data.get("image_aspect_ratio", "square")))

  @classmethod
  def batch_spec(cls, cfg, config):
    """pixels [B, T, S, S, 3] float32 (with data.feature_cache: features [B, T, 1+G*G, D] in the
    towers' dtype); input_ids/labels/attention_mask [B, data.max_len] int32."""
    b, t, s = cfg.train.batch_size, config.num_frames, config.video_tower.image_size
    media = (jax.ShapeDtypeStruct((b, *cached_shape(config)), config.video_tower.dtype) if cfg.data.get("feature_cache")
             else jax.ShapeDtypeStruct((b, t, s, s, 3), np.float32))
    return {"features" if cfg.data.get("feature_cache") else "pixels": media,
            **{k: jax.ShapeDtypeStruct((b, cfg.data.max_len), np.int32)
               for k in ("input_ids", "labels", "attention_mask")}}

  @classmethod
  def dataset(cls, cfg, config, tokenizer_dir):
    """Up to three groups, images, videos and text-only records (`datasets.by_media_kind`)."""
    return instruction_groups(cls, cfg, config, tokenizer_dir)

  # --- feature cache ------------------------------------------------------------------------

  @classmethod
  def frozen_encoders(cls, cfg, config):
    """The image and video towers (frozen in every stage)."""
    return TOWERS

  @classmethod
  def feature_sources(cls, cfg, config, tokenizer_dir):
    return instruction_sources(cls, cfg, config, tokenizer_dir)

  @classmethod
  def feature_preprocessing(cls, cfg, config):
    return dict(num_frames=config.num_frames, image_size=config.video_tower.image_size, **PREPROCESS,
                image_aspect_ratio=cfg.data.get("image_aspect_ratio", "square"))

  @classmethod
  def feature_shapes(cls, cfg, config):
    """image_features [1, G*G, D] (an image's patches, CLS dropped), video_features
    [1, T, 1+G*G, D]: each in the entries of its kind of media, in the dtype its tower computes."""
    image, video = config.image_tower, config.video_tower
    return {"image_features": ((1, image.grid ** 2, image.width), jnp.dtype(image.dtype)),
            "video_features": ((1, config.num_frames, video.grid ** 2 + 1, video.width), jnp.dtype(video.dtype))}

  @classmethod
  def encode_features(cls, config, params, name, units):
    """image: [N, S, S, 3] -> [N, G*G, D]; video: [N, T, S, S, 3] -> [N, T, 1+G*G, D]."""
    method = {"image": "image_features", "video": "video_features"}[name]
    return VideoLlava(config).apply({"params": params}, units, method=method)

  @classmethod
  def cached_decode(cls, cfg, config, decode, files):
    if config.image_tower.grid != config.video_tower.grid:
      raise ValueError(f"a feature cache puts an image's patches in a video frame's place: image_tower.grid "
                       f"{config.image_tower.grid} != video_tower.grid {config.video_tower.grid}")
    return CachedDecode(decode, files, cached_shape(config), config.video_tower.dtype)


def cached_shape(config: VideoLlavaConfig) -> tuple[int, int, int]:
  """A cached example's features: [T, 1+G*G, D]."""
  return config.num_frames, config.video_tower.grid ** 2 + 1, config.video_tower.width


@dataclasses.dataclass(frozen=True)
class Decode:
  """record -> example (see the module doc); picklable for grain worker processes."""
  tokenizer_dir: str
  max_text_len: int
  max_len: int
  num_frames: int
  image_size: int
  image_token_id: int
  video_token_id: int
  num_image_tokens: int
  num_video_tokens: int
  image_resize: str = PREPROCESS["resize"]  # images: padded to a square first ("pad") or not

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    media = None if record.get("kind") == "text" else self.load(record)
    example = self.text(record, None if media is None else media.is_image)
    # No media: zero pixels keep the batch's shape (one compiled step for every group).
    example["pixels"] = (np.zeros((self.num_frames, self.image_size, self.image_size, 3), np.float32)
                         if media is None else media.frames.frames)
    return example

  def load(self, record: dict[str, Any]) -> Media:
    """The record's image or video, preprocessed for training."""
    resize = self.image_resize if video_lib.is_image_path(record["media"]) else PREPROCESS["resize"]
    return load_media(record["media"], self.num_frames, self.image_size, **dict(PREPROCESS, resize=resize))

  def media_inputs(self, record: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """For a feature cache: ({image: [1, S, S, 3]} or {video: [1, T, S, S, 3]}, {is_image});
    nothing for a text-only record."""
    if record.get("kind") == "text":
      return {}, {}
    media = self.load(record)
    pixels = media.frames.frames
    return ({"image": pixels[:1]} if media.is_image else {"video": pixels[None]}), dict(is_image=bool(media.is_image))

  def text(self, record: dict[str, Any], is_image: bool | None) -> dict[str, np.ndarray]:
    """input_ids, labels, attention_mask [max_len] of the record, its media turn an image's or a
    video's (is_image None: a text-only record, no media turn)."""
    tokenizer = VideoLlavaSystem.training_tokenizer(self.tokenizer_dir)
    turns = conv_lib.conversation_turns(record["conversation"])
    run = None
    if is_image is not None:
      placeholder = IMAGE_TOKEN if is_image else VIDEO_TOKEN
      turns[0] = (placeholder + "\n" + turns[0][0], turns[0][1])
      run = ((self.image_token_id, self.num_image_tokens) if is_image
             else (self.video_token_id, self.num_video_tokens))
    pieces = conv_lib.training_pieces(conv_lib.LLAVA_V1, turns)
    # Cut with each placeholder counted once, then expand it.
    ids, labels = conv_lib.encode_text(tokenizer, pieces, {IMAGE_TOKEN: (-1, 1), VIDEO_TOKEN: (-1, 1)})
    ids, labels = ids[:self.max_text_len], labels[:self.max_text_len]
    if run is None and -1 in ids:
      raise ValueError("a text-only record holds a media mark")
    if run is not None:
      if -1 not in ids:
        raise ValueError(f"the media turn of {record['media']} lies past max_text_len {self.max_text_len}")
      at = ids.index(-1)
      token_id, count = run
      ids = ids[:at] + [token_id] * count + ids[at + 1:]
      labels = labels[:at] + [conv_lib.IGNORE_INDEX] * count + labels[at + 1:]
    ids, labels = ids[:self.max_len], labels[:self.max_len]
    return {k: v[0] for k, v in conv_lib.collate([(ids, labels)], multiple=self.max_len).items()}


@dataclasses.dataclass(frozen=True)
class CachedDecode:
  """record (with its `cache_index`) -> the example `decode` gives, features [T, 1+G*G, D] from the
  cache's `files` in place of its pixels (see the module doc). A record whose media could not be
  read when the cache was made raises, as its decode did."""
  decode: Decode
  files: tuple[str, ...]
  shape: tuple[int, int, int]  # [T, 1+G*G, D]
  dtype: str                   # the towers'

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    features = np.zeros(self.shape, jnp.dtype(self.dtype))
    if record.get("kind") == "text":
      return dict(self.decode.text(record, None), features=features)
    entry = feature_cache.entry(self.files, record)
    if entry["is_image"]:
      features[0, 1:] = entry["image_features"][0]
    else:
      features[:] = entry["video_features"][0]
    return dict(self.decode.text(record, bool(entry["is_image"])), features=features)
