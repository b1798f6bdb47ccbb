"""Video-LLaVA as a system: 8 frames by linspace, short side resized to 224 and centre-cropped
(images as CLIPImageProcessor does), the image and video towers with the shared projector, the
llava_v1 template with `<image>` (256 tokens) / `<video>` (8 x 257), and training examples from
LLaVA-style conversation JSON mixing images, videos and text-only conversations.

A training example (fixed shapes, so that batches stack and the step compiles once):
  pixels [T, S, S, 3] float32: a video's T frames, or an image in frame 0 (the rest copies), or
    zeros for a text-only record (whose text has no media turn);
  input_ids, labels, attention_mask [L] int32, right-padded, labels -100 where nothing is learned.
The text is the llava_v1 training format with the media turn ("<image>\\n" or "<video>\\n") opening
the first question, cut at `data.max_text_len` tokens with each placeholder counted once (the
reference's model_max_length), then expanded; L = `data.max_len` (its tokenizer_model_max_length)
bounds the expanded sequence. Batches hold only images, only videos or only text (the
reference's group_by_modality_length keeps text apart), so each training step runs at most one tower.
"""

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax.data import conversation as conv_lib
from vllm_jax.data import datasets
from vllm_jax.data.media import Media, load_media
from vllm_jax.models.video_llava import VideoLlava, VideoLlavaConfig, abstract_params, init_inputs
from vllm_jax.systems.base import System, apply, llm_loss
from vllm_jax.train import trainer

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
PREPROCESS = dict(sampling="linspace", resize="short_side_crop")


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
      ids, pixels = batch["input_ids"], batch["pixels"]

      def tokens_if_asked(method, token_id, inputs):
        encode = lambda: model.apply({"params": params}, inputs, method=method)
        nothing = lambda: jnp.zeros_like(jax.eval_shape(encode))
        return jax.lax.cond(jnp.any(ids == token_id), encode, nothing)

      embeds = model.apply({"params": params}, ids,
                           tokens_if_asked("encode_images", config.image_token_id, pixels[:, 0]),
                           tokens_if_asked("encode_videos", config.video_token_id, pixels), method="embed")
      return llm_loss(config.llama, params, embeds, batch, rng)
    return loss

  @classmethod
  def decoder(cls, cfg, config, tokenizer_dir) -> "Decode":
    """The training example builder: a record -> an example (see the module doc)."""
    return Decode(tokenizer_dir=tokenizer_dir, max_text_len=cfg.data.max_text_len, max_len=cfg.data.max_len,
                  num_frames=config.num_frames, image_size=config.video_tower.image_size,
                  image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                  num_image_tokens=config.num_image_tokens, num_video_tokens=config.num_video_tokens)

  @classmethod
  def batch_spec(cls, cfg, config):
    """pixels [B, T, S, S, 3] float32; input_ids/labels/attention_mask [B, data.max_len] int32."""
    b, t, s = cfg.train.batch_size, config.num_frames, config.video_tower.image_size
    return {"pixels": jax.ShapeDtypeStruct((b, t, s, s, 3), np.float32),
            **{k: jax.ShapeDtypeStruct((b, cfg.data.max_len), np.int32)
               for k in ("input_ids", "labels", "attention_mask")}}

  @classmethod
  def dataset(cls, cfg, config, tokenizer_dir):
    """Up to three groups, images, videos and text-only records (`datasets.by_media_kind`)."""
    data = cfg.data
    if not data.instruct_json:
      raise ValueError("no training data: set data.instruct_json (+ data.instruct_dir)")
    return datasets.by_media_kind(data, datasets.llava_records(data.instruct_json, data.instruct_dir),
                                  cls.decoder(cfg, config, tokenizer_dir), cfg.seed)

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

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    tokenizer = VideoLlavaSystem.training_tokenizer(self.tokenizer_dir)
    turns = conv_lib.conversation_turns(record["conversation"])
    if record.get("kind") == "text":
      # No media turn; zero pixels keep the batch's shape (one compiled step for every group).
      pixels, run = np.zeros((self.num_frames, self.image_size, self.image_size, 3), np.float32), None
    else:
      media = load_media(record["media"], self.num_frames, self.image_size, **PREPROCESS)
      pixels = media.frames.frames
      placeholder = IMAGE_TOKEN if media.is_image else VIDEO_TOKEN
      turns[0] = (placeholder + "\n" + turns[0][0], turns[0][1])
      run = ((self.image_token_id, self.num_image_tokens) if media.is_image
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
    example = {k: v[0] for k, v in conv_lib.collate([(ids, labels)], multiple=self.max_len).items()}
    example["pixels"] = pixels
    return example
