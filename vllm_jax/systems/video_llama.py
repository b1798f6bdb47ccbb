"""Video-LLaMA as a system: uniform frames squashed to the ViT's size, the video (and audio) branch
tokens, the vicuna_v0 / llama_2 templates with `<ImageHere>` / `<AudioHere>`, and training
examples from video captions (stage 1) or instruction conversations (stage 2).

A training example (fixed shapes, so that batches stack and the step compiles once):
  frames [T, S, S, 3] float32, frame_mask [T] bool (False on padding frames);
  input_ids, labels, attention_mask [L] int32, right-padded, labels -100 where nothing is learned;
  audio [N, 1, mel, frames] float32, with `data.with_audio` (zeros for media without sound).
With `data.feature_cache` (a folder written by `vllm-jax cache-features`, see
`vllm_jax.data.feature_cache`) frames and audio are replaced by what the frozen encoders made of
them: frame_features [T, Q, E] float32 and audio_features [N, D] float32; the text is built as above
from the media's cached timestamps and audio validity, and the loss skips the frozen encoders.
Token layouts (see `vllm_jax.data.conversation`):
  caption:      [BOS, <AudioHere> x Qa (videos with sound), <ImageHere> x Qv, caption + end_sym],
                the caption cut at `max_text_len` tokens; only the caption is learned.
  conversation: the template's training text, the media turn opening the first question,
                cut at `max_text_len` tokens (placeholders included, as Video-LLaMA counts them).
L is the longest layout the configured sources can produce (`seq_len`).
"""

import dataclasses
import hashlib
import logging
from typing import Any, Sequence

import jax
import numpy as np

from vllm_jax.data import conversation as conv_lib
from vllm_jax.data import datasets
from vllm_jax.data import feature_cache
from vllm_jax.data.audio import AudioClipConfig
from vllm_jax.data.media import Media, load_media
from vllm_jax.models.video_llama import VideoLlama, VideoLlamaConfig, abstract_params, init_inputs
from vllm_jax.systems.base import System, apply, llm_loss
from vllm_jax.train import trainer

log = logging.getLogger(__name__)

INSTRUCTION_READERS = {"llava": datasets.llava_records, "videochat": datasets.videochat_records}
VISION_ENCODERS = ("vision/visual_encoder/", "vision/ln_vision/", "vision/qformer/")
AUDIO_ENCODER = ("audio/encoder/",)


def encode_media(config: VideoLlamaConfig, params, frames: jax.Array, frame_mask: jax.Array | None = None,
                 audio: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
  """frames [B, T, H, W, 3], mask [B, T], audio [B, N, 1, mel, frames] | None -> (video tokens
  [B, 32, E], audio tokens [B, 8, E] | None): encoded once, reused by every turn."""
  model = VideoLlama(config)
  video = apply(model, "encode_video", params, frames, frame_mask)
  return video, None if audio is None else apply(model, "encode_audio", params, audio)


def embed_with_media(config: VideoLlamaConfig, params, input_ids: jax.Array, video_tokens: jax.Array | None,
                     audio_tokens: jax.Array | None) -> jax.Array:
  """[B, L] ids with placeholder runs -> [B, L, E] embeddings with the media tokens spliced in."""
  return apply(VideoLlama(config), "embed", params, input_ids, video_tokens, audio_tokens)


def clip_config(config: VideoLlamaConfig) -> AudioClipConfig:
  """The audio clips the model's audio branch reads (Video-LLaMA: 8 clips of 128 mel x 204 frames)."""
  if config.audio is None:
    return AudioClipConfig()
  enc = config.audio.encoder
  return AudioClipConfig(num_clips=config.audio.max_clips, num_mel_bins=enc.num_mel_bins, num_frames=enc.num_frames)


class VideoLlamaSystem(System):
  model_type = "video_llama"
  config_class = VideoLlamaConfig
  module = VideoLlama
  abstract_params = staticmethod(abstract_params)
  init_inputs = staticmethod(init_inputs)
  placeholder_tokens = (conv_lib.IMAGE_TOKEN, conv_lib.AUDIO_TOKEN)
  placeholder_fields = ("video_token_id", "audio_token_id")

  @property
  def has_audio(self) -> bool:
    return self.config.audio is not None

  def load_media(self, path, use_audio=False, num_frames=None, bounds=None, folder_fps=None):
    return load_media(path, num_frames or self.config.num_frames, self.config.vision.vit.image_size,
                      with_audio=use_audio, audio_config=clip_config(self.config), bounds=bounds,
                      folder_fps=folder_fps)

  def conversation(self, media, use_audio=False):
    return conv_lib.Conversation.for_media(self.template, media.frames.timestamps, media.is_image,
                                           use_audio and media.audio_valid)

  def placeholders(self, media):
    del media  # the same runs for every item
    cfg = self.config
    return {conv_lib.IMAGE_TOKEN: (cfg.video_token_id, cfg.num_video_tokens),
            conv_lib.AUDIO_TOKEN: (cfg.audio_token_id, cfg.num_audio_tokens)}

  def encode_media(self, media: Sequence[Media], use_audio=False):
    """With `use_audio` every row carries clips (zeros where a file has none, which its prompt
    then does not ask for): one compiled encoder serves every batch."""
    clips = None
    if use_audio:
      c = clip_config(self.config)
      empty = np.zeros((c.num_clips, 1, c.num_mel_bins, c.num_frames), np.float32)
      clips = np.stack([m.audio if m.audio_valid else empty for m in media])
    return encode_media(self.config, self.params, np.stack([m.frames.frames for m in media]),
                        np.stack([m.frames.frame_mask for m in media]), clips)

  def embed(self, input_ids, tokens, conversations):
    del conversations  # the tokens do not depend on the text
    return embed_with_media(self.config, self.params, np.asarray(input_ids), *tokens)

  # --- training -----------------------------------------------------------------------------

  @classmethod
  def stage_config(cls, cfg, config):
    """Vision-only stages (no data.with_audio) build the model without its audio branch."""
    return config if cfg.data.with_audio else config.replace(audio=None)

  @classmethod
  def loss_fn(cls, config) -> trainer.LossFn:
    model = VideoLlama(config)

    def loss(params, batch, rng):
      if "frame_features" in batch:  # a feature cache's batch: the frozen encoders ran when it was made
        media = dict(frame_features=batch["frame_features"], audio_features=batch.get("audio_features"))
      else:
        media = dict(frames=batch["frames"], audio=batch.get("audio"))
      embeds = model.apply({"params": params}, batch["input_ids"], frame_mask=batch["frame_mask"],
                           method="embed_inputs", **media)
      return llm_loss(config.llama, params, embeds, batch, rng)
    return loss

  @classmethod
  def dataset(cls, cfg, config, tokenizer_dir):
    return make_dataset(cfg, config, tokenizer_dir)

  @classmethod
  def batch_spec(cls, cfg, config):
    """frames [B, T, S, S, 3] float32, frame_mask [B, T] bool, input_ids/labels/attention_mask
    [B, seq_len] int32, audio [B, N, 1, mel, frames] float32 with data.with_audio; with
    data.feature_cache, frame_features [B, T, Q, E] (and audio_features [B, N, D]) instead of frames
    (and audio). With no data source set, L is the longer of the caption and the conversation layouts."""
    b, t, s = cfg.train.batch_size, config.num_frames, config.vision.vit.image_size
    if not cfg.data.webvid_csv and not cfg.data.instruct_json:
      cfg = cfg.copy_and_resolve_references()
      cfg.data.webvid_csv = cfg.data.instruct_json = "(any)"
    length = seq_len(cfg, config)
    spec = {"frames": jax.ShapeDtypeStruct((b, t, s, s, 3), np.float32),
            "frame_mask": jax.ShapeDtypeStruct((b, t), np.bool_),
            **{k: jax.ShapeDtypeStruct((b, length), np.int32) for k in ("input_ids", "labels", "attention_mask")}}
    if cfg.data.with_audio:
      c = clip_config(config)
      spec["audio"] = jax.ShapeDtypeStruct((b, c.num_clips, 1, c.num_mel_bins, c.num_frames), np.float32)
    if cfg.data.get("feature_cache"):  # the frozen encoders' outputs replace frames and audio
      spec = {k: v for k, v in spec.items() if k not in ("frames", "audio")}
      for name, (shape, dtype) in cls.feature_shapes(cfg, config).items():
        spec[name] = jax.ShapeDtypeStruct((b, *shape), dtype)
    return spec

  # --- feature cache ------------------------------------------------------------------------

  @classmethod
  def frozen_encoders(cls, cfg, config):
    """EVA ViT + ln_vision + image Q-Former; ImageBind with data.with_audio."""
    return VISION_ENCODERS + (AUDIO_ENCODER if cfg.data.with_audio else ())

  @classmethod
  def feature_sources(cls, cfg, config, tokenizer_dir):
    return data_sources(cfg, config, tokenizer_dir)

  @classmethod
  def feature_preprocessing(cls, cfg, config):
    """Frame count, size, sampling, crop, seed and audio clips (`Decode`'s)."""
    audio = clip_config(config) if cfg.data.with_audio else None
    return dict(num_frames=config.num_frames, image_size=config.vision.vit.image_size, sampling=cfg.data.sampling,
                train_crop=cfg.data.train_crop, seed=cfg.seed,
                audio=None if audio is None else dataclasses.asdict(audio))

  @classmethod
  def feature_shapes(cls, cfg, config):
    """frame_features [T, Q, E] (ViT + ln_vision + image Q-Former, before the frame positions),
    frame_mask [T] and, with data.with_audio, audio_features [N, D] (ImageBind)."""
    vision, t = config.vision, config.num_frames
    shapes = {"frame_features": ((t, vision.qformer.num_queries, vision.qformer.hidden_size), np.float32),
              "frame_mask": ((t,), np.bool_)}
    if cfg.data.with_audio:
      shapes["audio_features"] = ((config.audio.max_clips, config.audio.encoder.out_dim), np.float32)
    return shapes

  @classmethod
  def encode_features(cls, config, params, name, units):
    """frame: [N, S, S, 3] -> [N, Q, E]; audio: clips [N, 1, mel, frames] -> [N, D]."""
    if name == "frame":
      one = lambda model, x: model.vision.frame_features(x[:, None])[:, 0]
    else:
      one = lambda model, x: model.audio.encoder(x[:, None])[:, 0]
    return VideoLlama(config).apply({"params": params}, units, method=one)

  @classmethod
  def cached_decode(cls, cfg, config, decode, files):
    return CachedDecode(decode, files)


@dataclasses.dataclass(frozen=True)
class Decode:
  """record -> example (see the module doc). Picklable: grain worker processes run it, each
  loading the tokenizer once. Frame sampling and cropping draw from a generator seeded by
  (seed, media path), so a run is reproducible and resumes exactly."""
  tokenizer_dir: str
  stage: int                       # 1: record["caption"]; 2: record["conversation"]
  seq_len: int
  max_text_len: int
  num_frames: int
  image_size: int
  num_video_tokens: int
  num_audio_tokens: int
  audio: AudioClipConfig | None    # None: no audio input
  template: str = "vicuna_v0"
  end_sym: str = "\n"
  sampling: str = "headtail"       # "headtail" (training) or "uniform"
  train_crop: bool = True          # RandomResizedCrop(scale 0.5-1) on the frames
  seed: int = 0

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    media = self.load(record)
    with_audio = self.audio is not None and media.audio_valid
    return {**self.text(record, media.frames.timestamps, media.is_image, with_audio), **self.media_arrays(media)}

  def load(self, record: dict[str, Any]) -> Media:
    """The record's media, frames sampled (and cropped) as for training."""
    digest = hashlib.sha256(f"{self.seed}:{record['media']}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return load_media(record["media"], self.num_frames, self.image_size, with_audio=self.audio is not None,
                      audio_config=self.audio or AudioClipConfig(), sampling=self.sampling, rng=rng,
                      train_crop=self.train_crop)

  def media_inputs(self, record: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """For a feature cache: ({frame: frames [T, S, S, 3], audio: clips [N, 1, mel, frames]},
    {frame_mask, timestamps, is_image, audio_valid})."""
    media = self.load(record)
    arrays = self.media_arrays(media)
    inputs = {unit: arrays.pop(key) for unit, key in (("frame", "frames"), ("audio", "audio")) if key in arrays}
    return inputs, dict(arrays, timestamps=np.asarray(media.frames.timestamps, np.float64),
                        is_image=bool(media.is_image), audio_valid=bool(media.audio_valid))

  def media_arrays(self, media: Media) -> dict[str, np.ndarray]:
    """frames [T, S, S, 3], frame_mask [T] and, with audio, audio [N, 1, mel, frames] (zeros without sound)."""
    arrays = dict(frames=media.frames.frames, frame_mask=media.frames.frame_mask)
    if self.audio is not None:
      shape = (self.audio.num_clips, 1, self.audio.num_mel_bins, self.audio.num_frames)
      arrays["audio"] = media.audio if media.audio_valid else np.zeros(shape, np.float32)
    return arrays

  def text(self, record: dict[str, Any], timestamps, is_image: bool, with_audio: bool) -> dict[str, np.ndarray]:
    """input_ids, labels, attention_mask [seq_len] of the record, about media with these properties."""
    tokenizer = VideoLlamaSystem.training_tokenizer(self.tokenizer_dir)
    if self.stage == 1:
      media_text = (conv_lib.AUDIO_TOKEN if with_audio else "") + conv_lib.IMAGE_TOKEN
      ids, labels = conv_lib.encode_pieces(tokenizer, [(media_text, False)], self.num_video_tokens,
                                           self.num_audio_tokens)
      # The caption alone (its own segment, as in the full text), without its BOS.
      text = conv_lib.encode_pieces(tokenizer, [(record["caption"] + self.end_sym, True)])[0][1:]
      ids, labels = ids + text[:self.max_text_len], labels + text[:self.max_text_len]
    else:
      turns = conv_lib.conversation_turns(record["conversation"])
      first = conv_lib.media_turn(timestamps, is_image, with_audio)
      turns[0] = (first + turns[0][0], turns[0][1])
      ids, labels = conv_lib.encode_training(tokenizer, conv_lib.get_template(self.template), turns,
                                             num_video_tokens=self.num_video_tokens,
                                             num_audio_tokens=self.num_audio_tokens)
      ids, labels = ids[:self.max_text_len], labels[:self.max_text_len]
    return {k: v[0] for k, v in conv_lib.collate([(ids, labels)], multiple=self.seq_len).items()}


@dataclasses.dataclass(frozen=True)
class CachedDecode:
  """record (with its `cache_index`) -> the example `decode` gives, frames and audio replaced by
  their features in the cache's `files` (frame_features, audio_features; see the module doc). A
  record whose media could not be read when the cache was made raises, as its decode did."""
  decode: Decode
  files: tuple[str, ...]

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    entry = feature_cache.entry(self.files, record)
    with_audio = self.decode.audio is not None and bool(entry["audio_valid"])
    example = self.decode.text(record, [float(t) for t in entry["timestamps"]], bool(entry["is_image"]), with_audio)
    example.update(frame_features=entry["frame_features"], frame_mask=entry["frame_mask"])
    if self.decode.audio is not None:
      example["audio_features"] = entry["audio_features"]
    return example


def seq_len(cfg, config: VideoLlamaConfig) -> int:
  media = 1 + config.num_video_tokens + (config.num_audio_tokens if cfg.data.with_audio else 0)
  return max(media + cfg.data.max_text_len if cfg.data.webvid_csv else 0,
             cfg.data.max_text_len if cfg.data.instruct_json else 0)


@dataclasses.dataclass(frozen=True)
class Source:
  """One configured data source: its records, their decode, mixture weight, shuffle seed and the
  annotation files and media folder it reads (what a feature cache records)."""
  name: str                  # "captions" | "instructions"
  records: list[dict[str, Any]]
  decode: Decode
  weight: float
  seed: int
  files: tuple[str, ...]
  media_dir: str


def media_records(records: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
  """The records with media: text-only conversations (neither "image" nor "video") are left out
  with one warning that counts them, as Video-LLaMA's reference trains on media conversations only
  (its instruction datasets read every item's image or video)."""
  kept = datasets.of_kinds(records, "image", "video")  # a manifest's files of those kinds: no scan
  if not kept:
    raise ValueError(f"{path} holds no conversation with an image or video: Video-LLaMA trains only on media")
  if len(kept) < len(records):
    log.warning("%s: %d text-only conversations skipped: Video-LLaMA's reference trains only on media",
                path, len(records) - len(kept))
  return kept


def data_sources(cfg, config: VideoLlamaConfig, tokenizer_dir: str) -> list[Source]:
  """The sources of `data.webvid_*` captions and `data.instruct_*` conversations, as configured."""
  data = cfg.data
  if not data.webvid_csv and not data.instruct_json:
    raise ValueError("no training data: set data.webvid_csv (+ data.webvid_dir) and/or data.instruct_json "
                     "(+ data.instruct_dir)")
  if data.with_audio and config.audio is None:
    raise ValueError("data.with_audio needs a model with an audio branch")
  common = dict(
      tokenizer_dir=tokenizer_dir, seq_len=seq_len(cfg, config), max_text_len=data.max_text_len,
      num_frames=config.num_frames, image_size=config.vision.vit.image_size,
      num_video_tokens=config.num_video_tokens, num_audio_tokens=config.num_audio_tokens,
      audio=clip_config(config) if data.with_audio else None,
      template=config.template, end_sym=data.end_sym, sampling=data.sampling, train_crop=data.train_crop,
      seed=cfg.seed)
  sources = []
  if data.webvid_csv:
    sources.append(Source("captions", datasets.webvid_records(data.webvid_csv, data.webvid_dir),
                          Decode(stage=1, **common), data.weights[0], cfg.seed, (data.webvid_csv,), data.webvid_dir))
  if data.instruct_json:
    records = media_records(INSTRUCTION_READERS[data.instruct_format](data.instruct_json, data.instruct_dir),
                            data.instruct_json)
    sources.append(Source("instructions", records, Decode(stage=2, **common), data.weights[-1], cfg.seed + 1,
                          (data.instruct_json,), data.instruct_dir))
  return sources


def make_dataset(cfg, config: VideoLlamaConfig, tokenizer_dir: str):
  """The examples of every configured source (`data.webvid_*` captions, `data.instruct_*`
  conversations), mixed by `data.weights`. With `data.feature_cache`, the cache's features replace
  the media once the cache is found to fit this run (else ValueError naming what differs)."""
  sources = data_sources(cfg, config, tokenizer_dir)
  if cfg.data.get("feature_cache"):
    sources = feature_cache.from_cache(cfg, VideoLlamaSystem, config, sources)
  return datasets.from_sources(cfg.data, [(s.records, s.decode, s.weight, s.seed) for s in sources])
