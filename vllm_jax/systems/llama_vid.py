"""LLaMA-VID as a system: videos sampled at `fps` (1 by default) and images, each frame resized
as CLIPImageProcessor does; two tokens per frame, the context token read with the question of
the turn; the vicuna_v1 template with one `<image>` run of frames x tokens_per_frame.

Long videos never sit in memory whole: frames are decoded, preprocessed and encoded
`chunk_frames` at a time, and their ViT features go to a temporary file (`FrameFeatures`), so
that each question re-runs only the text-guided part, chunk by chunk, over the cached features.
As in the reference chat, the media stand in the newest question, their context tokens read
with it; earlier turns keep their text.

Training with `data.feature_cache` (`vllm-jax cache-features`, `vllm_jax.data.feature_cache`) reads
each frame's ViT features from the cache instead of decoding and encoding the frames (the ViT,
frozen in every stage, then stays off the devices); the text-guided part still runs on them.
With `data.video_features` (the long-video stage, as released) each video is a feature file
(`vllm_jax.data.long_video`): its frames' ViT features and the subtitles between them. Inference
takes such a file (`.pkl`) too, as the reference's movie chat does: the framed subtitles before
the question, each frame's tokens at its mark.
"""

import dataclasses
import functools
import os
import sys
import tempfile
import weakref
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax import paths
from vllm_jax.data import conversation as conv_lib
from vllm_jax.data import datasets
from vllm_jax.data import feature_cache
from vllm_jax.data import long_video
from vllm_jax.data import video as video_lib
from vllm_jax.data.media import Media, MediaError
from vllm_jax.data.tokenizer import load_instruction_tokenizer, save_tokenizer
from vllm_jax.models.llama_vid import LlamaVid, LlamaVidConfig, abstract_params, init_inputs, pack_turn_tokens
from vllm_jax.systems.base import System, apply, instruction_groups, instruction_sources, llm_loss
from vllm_jax.train import trainer

IMAGE_TOKEN = "<image>"
INSTRUCTION_TOKENIZER = "instruction_tokenizer"  # the BERT tokenizer's folder in a model folder
TEXT_BUCKET = 32  # instructions are padded to a multiple of this (padding is masked)


class FrameFeatures:
  """The ViT features [N, 1+G*G, D] float32 of one media item ([N, G*G, D] from a feature file),
  in a temporary file read back a chunk at a time (the file goes when the object does)."""

  def __init__(self, num_frames: int, tokens: int, width: int):
    self.shape = (num_frames, tokens, width)
    handle, self.path = tempfile.mkstemp(prefix="vllm_jax_features_", suffix=".f32")
    os.close(handle)
    weakref.finalize(self, os.remove, self.path)
    self.last: tuple[str, jax.Array] | None = None  # (question, its media tokens): the latest turn's

  def write(self, chunks):
    """Append the chunks [n, 1+G*G, D] (in frame order) until the file holds every frame."""
    written = 0
    with open(self.path, "wb") as f:
      for chunk in chunks:
        f.write(np.ascontiguousarray(chunk, np.float32).tobytes())
        written += len(chunk)
    if written != self.shape[0]:
      raise ValueError(f"{written} frames encoded, {self.shape[0]} expected")

  def read(self, start: int, stop: int) -> np.ndarray:
    """Frames [start, stop) -> [stop - start, 1+G*G, D] (a plain read: nothing stays mapped)."""
    frame = self.shape[1] * self.shape[2]
    with open(self.path, "rb") as f:
      f.seek(start * frame * 4)
      data = np.fromfile(f, np.float32, (stop - start) * frame)
    return data.reshape(stop - start, *self.shape[1:])


def _bucket(n: int, most: int) -> int:
  """The power of two >= n (at most `most`): chunk shapes that compile once each."""
  return min(most, 1 << max(0, (n - 1).bit_length()))


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)]) if len(x) < rows else x


class LlamaVidSystem(System):
  model_type = "llama_vid"
  config_class = LlamaVidConfig
  module = LlamaVid
  abstract_params = staticmethod(abstract_params)
  init_inputs = staticmethod(init_inputs)
  placeholder_tokens = (IMAGE_TOKEN,)
  placeholder_fields = ("image_token_id",)

  def __init__(self, config, params, tokenizer, instruction_tokenizer=None):
    super().__init__(config, params, tokenizer)
    self.instruction_tokenizer = instruction_tokenizer

  @classmethod
  def load(cls, model_dir, mesh=None, **llama_overrides):
    system = super().load(model_dir, mesh, **llama_overrides)
    system.instruction_tokenizer = load_instruction_tokenizer(paths.join(model_dir, INSTRUCTION_TOKENIZER))
    cls.check_instruction_tokenizer(system.config, system.instruction_tokenizer, model_dir)
    return system

  def save(self, out_dir):
    super().save(out_dir)
    save_tokenizer(self.instruction_tokenizer, paths.join(out_dir, INSTRUCTION_TOKENIZER))

  @staticmethod
  def check_instruction_tokenizer(config: LlamaVidConfig, tokenizer, where: str) -> None:
    if len(tokenizer) > config.qformer.vocab_size:
      raise ValueError(f"the instruction tokenizer in {where} has {len(tokenizer)} tokens, the Q-Former's "
                       f"vocabulary {config.qformer.vocab_size}")

  # --- inference ----------------------------------------------------------------------------

  def load_media(self, path, use_audio=False, num_frames=None, bounds=None, folder_fps=None):
    """An image; a video's frames at `fps` (at most `num_frames` of them, evenly spread, if given),
    decoded later, in chunks, by `encode_media`; or a long video's feature file (`long_video`: its
    frames' ViT features, thinned to `num_frames` if given, and its subtitles)."""
    del use_audio  # no audio branch
    size = self.config.vit.image_size
    if video_lib.is_image_path(path):
      return Media(path, video_lib.load_image(path, 1, size, resize="short_side_crop"))
    if long_video.is_feature_file(path):
      if bounds is not None:
        raise MediaError(f"{path} is a long video's feature file: it cannot be cut to {bounds[0]}-{bounds[1]} s")
      try:
        movie = checked_features(long_video.load(path).thinned(num_frames), path, file_frame_shape(self.config))
      except ValueError as e:
        raise MediaError(str(e)) from None
      # The reference extracts a feature file's frames at 1 per second.
      return Media(path, video_lib.Frames(None, np.ones(len(movie), bool), [float(t) for t in range(len(movie))]),
                   movie=movie)
    stream = video_lib.FrameStream(path, self.config.fps, num_frames, bounds, folder_fps)
    return Media(path, video_lib.Frames(None, np.ones(len(stream), bool), stream.timestamps), bounds=bounds,
                 folder_fps=folder_fps)

  def feature_file(self, path: str, subtitles: Sequence[long_video.Subtitle] = ()) -> bytes:
    """A video file as a long video's feature file (`long_video`), as the reference extracts one:
    its frames at `fps`, each frame's ViT features [T, 1+G*G, D] float16, and `subtitles` placed
    between the frames (`long_video.subtitled`)."""
    if video_lib.is_image_path(path) or long_video.is_feature_file(path):
      raise MediaError(f"{path} is not a video file")
    cfg = self.config
    stream = video_lib.FrameStream(path, cfg.fps)
    n = len(stream)
    encoded = self._encoded(n, stream.chunks(cfg.chunk_frames, cfg.vit.image_size))
    features = np.empty(encoded.shape, np.float16)  # filled a chunk at a time: an hour is 2.6 GB
    for start in range(0, n, cfg.chunk_frames):
      features[start:start + cfg.chunk_frames] = encoded.read(start, min(n, start + cfg.chunk_frames))
    return long_video.dumps(features, long_video.subtitled(stream.indices / stream.video_fps, list(subtitles)))

  def conversation(self, media, use_audio=False):
    turn = IMAGE_TOKEN if media.movie is None else media.movie.framed()
    return conv_lib.Conversation(self.template).open_with(turn + "\n", follow=True)

  def placeholders(self, media):
    """A mark stands for every frame's tokens; in a long video's turn, for its own frame's."""
    frames = 1 if media.movie is not None else len(media.frames.timestamps)
    return {IMAGE_TOKEN: (self.config.image_token_id, frames * self.config.tokens_per_frame)}

  def encode_media(self, media: Sequence[Media], use_audio=False) -> list[FrameFeatures]:
    """Each item's ViT features, encoded `chunk_frames` frames at a time into a FrameFeatures."""
    cfg = self.config
    encoded = []
    for m in media:
      n = len(m.frames.timestamps)
      if m.movie is not None:  # the ViT ran when the file was made
        features = FrameFeatures(n, *m.movie.features.shape[1:])
        features.write(m.movie.features[i:i + cfg.chunk_frames] for i in range(0, n, cfg.chunk_frames))
      elif m.frames.frames is not None:
        features = self._encoded(n, (m.frames.frames[i:i + cfg.chunk_frames] for i in range(0, n, cfg.chunk_frames)))
      else:
        stream = video_lib.FrameStream(m.path, cfg.fps, n, m.bounds, m.folder_fps)
        features = self._encoded(n, stream.chunks(cfg.chunk_frames, cfg.vit.image_size))
      encoded.append(features)
    return encoded

  def _encoded(self, n: int, pixel_chunks) -> FrameFeatures:
    """The ViT features of n frames given in chunks of at most `chunk_frames` (with a progress bar
    when there are several)."""
    cfg = self.config
    model = LlamaVid(cfg)
    if n > cfg.chunk_frames:
      from tqdm import tqdm
      pixel_chunks = tqdm(pixel_chunks, total=-(-n // cfg.chunk_frames), unit="chunk", file=sys.stderr,
                          desc=f"encoding {n} frames")

    def encode(pixels):
      rows = _bucket(len(pixels), cfg.chunk_frames)
      return np.asarray(apply(model, "encode_frames", self.params, _padded(pixels, rows)))[:len(pixels)]
    features = FrameFeatures(n, cfg.vit.grid ** 2 + 1, cfg.vit.width)
    features.write(encode(p) for p in pixel_chunks)
    return features

  def media_tokens(self, features: FrameFeatures, question: str) -> jax.Array:
    """[N * tokens_per_frame, E]: every frame's tokens, the context token read with `question`
    (the text-guided part, `chunk_frames` frames at a time; the latest question's are kept)."""
    if features.last is not None and features.last[0] == question:
      return features.last[1]
    cfg = self.config
    ids = self.instruction_tokenizer(question, truncation=True, max_length=cfg.max_instruction_len).input_ids
    text_ids = np.zeros((1, -(-len(ids) // TEXT_BUCKET) * TEXT_BUCKET), np.int32)
    text_ids[0, :len(ids)] = ids
    text_mask = (np.arange(text_ids.shape[1]) < len(ids))[None].astype(np.int32)
    n, out = features.shape[0], []
    for start in range(0, n, cfg.chunk_frames):
      chunk = features.read(start, min(n, start + cfg.chunk_frames))
      rows = _bucket(len(chunk), cfg.chunk_frames)
      tokens = apply(LlamaVid(cfg), "frame_tokens", self.params, _padded(chunk, rows),
                     np.repeat(text_ids, rows, 0), np.repeat(text_mask, rows, 0))
      out.append(tokens[:len(chunk)])
    tokens = jnp.concatenate(out).reshape(n * cfg.tokens_per_frame, -1)
    features.last = (question, tokens)
    return tokens

  def embed(self, input_ids, features, conversations):
    """Each row's media tokens read with the questions its media stand in (one run each)."""
    rows = []
    for row_features, conv in zip(features, conversations):
      questions = conv.media_questions()
      rows.append(jnp.concatenate([self.media_tokens(row_features, q) for q in questions]) if questions else None)
    width = max((len(r) for r in rows if r is not None), default=1)
    zeros = jnp.zeros((width, self.config.llama.hidden_size), self.config.llama.dtype)
    tokens = jnp.stack([zeros if r is None else jnp.pad(r, ((0, width - len(r)), (0, 0))) for r in rows])
    return apply(LlamaVid(self.config), "embed", self.params, np.asarray(input_ids), tokens)

  # --- training -----------------------------------------------------------------------------

  @classmethod
  def stage_config(cls, cfg, config):
    """The recipe's `context_remat_policy` (a jax.checkpoint_policies name, set over `init_from`'s
    config too) for the trained text-guided part: each turn's pass over the frames, and each
    Q-Former layer within it, keeps only what it saves for the backward pass."""
    policy = cfg.get("context_remat_policy")
    if not policy:
      return config
    return config.replace(context_remat_policy=policy, qformer=config.qformer.replace(remat_policy=policy))

  @classmethod
  def loss_fn(cls, config) -> trainer.LossFn:
    """Each row's media tokens (`media_tokens`) spliced into its text, then the LLM."""
    model = LlamaVid(config)

    def loss(params, batch, rng):
      embeds = model.apply({"params": params}, batch["input_ids"], media_tokens(model, params, batch),
                           method="embed")
      return llm_loss(config.llama, params, embeds, batch, rng)
    return loss

  @classmethod
  def decoder(cls, cfg, config, tokenizer_dir) -> "Decode":
    """The training example builder (`Decode`); the instructions are read with init_from's
    instruction_tokenizer/, or data.instruction_tokenizer for a random init."""
    data = cfg.data
    if data.text_format not in TEXT_FORMATS:
      raise ValueError(f"unknown data.text_format {data.text_format!r}; expected one of {', '.join(TEXT_FORMATS)}")
    if data.max_len > config.llama.max_position_embeddings:
      raise ValueError(f"data.max_len {data.max_len} exceeds the LLM's context of "
                       f"{config.llama.max_position_embeddings} tokens (long videos need a long-context model)")
    instruction_dir = (paths.join(cfg.init_from, INSTRUCTION_TOKENIZER) if cfg.init_from
                       else data.instruction_tokenizer)
    if not instruction_dir:
      raise ValueError("set init_from (a model folder) or data.instruction_tokenizer (a BERT tokenizer folder, "
                       "for a random init)")
    cls.check_instruction_tokenizer(config, load_instruction_tokenizer(instruction_dir), instruction_dir)
    if data.get("video_features") and data.text_format != "conversation":
      raise ValueError("data.video_features (long videos' feature files) needs data.text_format conversation")
    return Decode(tokenizer_dir=tokenizer_dir, instruction_tokenizer_dir=instruction_dir,
                  text_format=data.text_format, max_text_len=data.max_text_len, max_len=data.max_len,
                  max_frames=data.max_frames, max_turns=data.max_turns,
                  max_instruction_len=config.max_instruction_len, image_size=config.vit.image_size,
                  fps=config.fps, image_token_id=config.image_token_id,
                  tokens_per_frame=config.tokens_per_frame, template=config.template,
                  image_resize=video_lib.image_resize(data.get("image_aspect_ratio", "square")))

  @classmethod
  def batch_spec(cls, cfg, config):
    """pixels [B, max_frames, S, S, 3] uint8 (with data.feature_cache: frame_features
    [B, max_frames, 1+G*G, D] in the ViT's dtype; with data.video_features, [B, max_frames, G*G, D]),
    num_frames [B] int32, instruction_ids/mask [B, max_turns, max_instruction_len] int32,
    input_ids/labels/attention_mask [B, max_len] int32."""
    data, b, s = cfg.data, cfg.train.batch_size, config.vit.image_size
    turns = (b, data.max_turns, config.max_instruction_len)
    features = lambda shape: {"frame_features": jax.ShapeDtypeStruct((b, data.max_frames, *shape), config.vit.dtype)}
    if data.get("video_features"):
      media = features(file_frame_shape(config))
    elif data.get("feature_cache"):
      media = features(frame_shape(config))
    else:
      media = {"pixels": jax.ShapeDtypeStruct((b, data.max_frames, s, s, 3), np.uint8)}
    return {**media,
            "num_frames": jax.ShapeDtypeStruct((b,), np.int32),
            "instruction_ids": jax.ShapeDtypeStruct(turns, np.int32),
            "instruction_mask": jax.ShapeDtypeStruct(turns, np.int32),
            **{k: jax.ShapeDtypeStruct((b, data.max_len), np.int32) for k in ("input_ids", "labels", "attention_mask")}}

  @classmethod
  def dataset(cls, cfg, config, tokenizer_dir):
    """Up to three groups, images, videos and text-only records, each batch drawn from one: a
    batch of images then runs the ViT and the Q-Former on one frame per row instead of max_frames,
    a text-only batch on none (`media_tokens`). The reference keeps text-only batches apart but
    mixes images and videos; grouping changes which examples share a step, not what each one
    contributes. With data.video_features the videos are feature files (`FeatureFileDecode`)."""
    if not cfg.data.get("video_features"):
      return instruction_groups(cls, cfg, config, tokenizer_dir)
    if cfg.data.get("feature_cache"):
      raise ValueError("data.video_features gives the ViT's features already: unset data.feature_cache")
    [source] = instruction_sources(cls, cfg, config, tokenizer_dir)
    images = len(datasets.of_kinds(source.records, "image"))
    if images:
      raise ValueError(f"{cfg.data.instruct_json} holds {images} image records: with data.video_features the "
                       "data are long videos' feature files and text-only conversations")
    decode = FeatureFileDecode(source.decode, file_frame_shape(config), config.vit.dtype)
    return datasets.by_media_kind(cfg.data, source.records, decode, cfg.seed)

  # --- feature cache ------------------------------------------------------------------------

  @classmethod
  def frozen_encoders(cls, cfg, config):
    """The EVA ViT (frozen in every stage). ValueError with data.video_features: the feature files
    hold what a cache would."""
    if cfg.data.get("video_features"):
      raise ValueError("data.video_features: the videos are feature files already, there is nothing to cache")
    return ("vision/",)

  @classmethod
  def feature_sources(cls, cfg, config, tokenizer_dir):
    return instruction_sources(cls, cfg, config, tokenizer_dir)

  @classmethod
  def feature_preprocessing(cls, cfg, config):
    """Frame rate, frame count bound and size, images' resize (`Decode.frames`)."""
    return dict(fps=config.fps, max_frames=cfg.data.max_frames, image_size=config.vit.image_size,
                image_aspect_ratio=cfg.data.get("image_aspect_ratio", "square"))

  @classmethod
  def feature_shapes(cls, cfg, config):
    """frame_features [n, 1+G*G, D]: the ViT on each of a record's n frames, in the dtype it computes
    (bfloat16 in the full-size recipes: exact, half of float32's bytes)."""
    return {"frame_features": ((None, *frame_shape(config)), jnp.dtype(config.vit.dtype))}

  @classmethod
  def encode_features(cls, config, params, name, units):
    """frame: [N, S, S, 3] uint8 -> [N, 1+G*G, D]."""
    assert name == "frame", name
    return LlamaVid(config).apply({"params": params}, normalized(units), method="encode_frames")

  @classmethod
  def cached_decode(cls, cfg, config, decode, files):
    return CachedDecode(decode, files, frame_shape(config), config.vit.dtype)


def normalized(pixels: jax.Array) -> jax.Array:
  """Training frames [..., 3] uint8 -> float32 as `video.normalize` makes them (up to float
  rounding), on the device: examples carry a quarter of the bytes through the input pipeline."""
  return (pixels.astype(jnp.float32) / 255.0 - video_lib.CLIP_MEAN) / video_lib.CLIP_STD


def frame_shape(config: LlamaVidConfig) -> tuple[int, int]:
  """A frame's ViT features: [1+G*G, D]."""
  return config.vit.grid ** 2 + 1, config.vit.width


def file_frame_shape(config: LlamaVidConfig) -> tuple[int, int]:
  """A frame's features as a long video's feature file gives them (`long_video.load`): [G*G, D]."""
  return config.vit.grid ** 2, config.vit.width


def checked_features(movie: long_video.LongVideo, path: str, shape: tuple[int, int]) -> long_video.LongVideo:
  """`movie` (read from `path`) when its frames' features have `shape` (`file_frame_shape`);
  ValueError naming the file otherwise."""
  if movie.features.shape[1:] != tuple(shape):
    (tokens, width), (want_tokens, want_width) = movie.features.shape[1:], shape
    raise ValueError(f"{path} holds features [T, {1 + tokens}, {width}]; this model's ViT gives "
                     f"[T, {1 + want_tokens}, {want_width}]")
  return movie


def media_tokens(model: LlamaVid, params, batch: dict[str, jax.Array]) -> jax.Array:
  """A batch of training examples (see `Decode`) -> the media tokens [B, R*F*T, E] that its
  placeholders take, in order (`pack_turn_tokens`): the ViT runs once per frame, the text-guided
  part once per (turn, frame) with that turn's instruction. Both take `chunk_frames` frames of
  each row at a time: for an hour of frames at once, the ViT's activations and the Q-Former's
  scores over queries and instruction would take tens of GiB. When no row has more than one frame
  (an image batch), only frame 0 runs; the tokens of the other frames are zeros, never read. When
  no row has any (a text-only batch), nothing runs: all the tokens are zeros, and none is read.
  The config's `context_remat_policy` says what each pass of the text-guided part keeps for the
  backward pass. A feature cache's batch holds the ViT's features of the frames (frame_features)
  in place of their pixels: the ViT does not run."""
  cached = "frame_features" in batch
  media = batch["frame_features"] if cached else batch["pixels"]
  text_ids, text_mask = batch["instruction_ids"], batch["instruction_mask"]
  b, max_frames = media.shape[:2]
  run = functools.partial(model.apply, {"params": params})
  chunk = model.config.chunk_frames

  def by_frames(fn, frames, *args):  # fn over [B, f, ...] -> [B, f, ...], on chunk frames of each row at a time
    if frames.shape[1] <= chunk:
      return fn(frames, *args)
    out = jax.lax.map(lambda x: fn(x[:, None], *args)[:, 0], jnp.swapaxes(frames, 0, 1), batch_size=chunk)
    return jnp.swapaxes(out, 0, 1)

  def encode(frames):  # [B, f, S, S, 3] uint8 -> [B, f, 1+G*G, D]
    features = run(normalized(frames.reshape(-1, *frames.shape[2:])), method="encode_frames")
    return features.reshape(*frames.shape[:2], *features.shape[1:])

  def one_turn(features, ids, mask):  # [B, f, 1+G*G, D], [B, L_t] x 2 -> [B, f, T, E]
    f = features.shape[1]
    tokens = run(features.reshape(b * f, *features.shape[2:]), jnp.repeat(ids, f, 0), jnp.repeat(mask, f, 0),
                 method="frame_tokens")
    return tokens.reshape(b, f, *tokens.shape[1:])

  policy = model.config.context_remat_policy
  if policy != "none":  # no barrier needed: in the turns' loop the rerun cannot merge with the forward
    one_turn = jax.checkpoint(one_turn, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=False)

  def turn_tokens(frames):  # [B, f, S, S, 3] (or cached [B, f, 1+G*G, D]) -> [B, R, max_frames, T, E]
    features = frames if cached else by_frames(encode, frames)
    # Turn by turn, so that the features are read by each instruction rather than copied R times.
    tokens = jax.lax.map(lambda text: by_frames(one_turn, features, *text),
                         (jnp.swapaxes(text_ids, 0, 1), jnp.swapaxes(text_mask, 0, 1)))  # [R, B, f, T, E]
    tokens = jnp.swapaxes(tokens, 0, 1)
    return jnp.pad(tokens, ((0, 0), (0, 0), (0, max_frames - frames.shape[1]), (0, 0), (0, 0)))

  first_frame = lambda: turn_tokens(media[:, :1])
  nothing = lambda: jnp.zeros_like(jax.eval_shape(first_frame))
  # By the most frames of any row: none, one (frame 0 only) or more (every frame).
  most = jnp.minimum(jnp.max(batch["num_frames"]), 2)
  tokens = jax.lax.switch(most, (nothing, first_frame, lambda: turn_tokens(media)))
  return pack_turn_tokens(tokens, batch["num_frames"])


TEXT_FORMATS = ("caption", "conversation")
VIDEO_MARKER = "<video>"  # the media mark of videos in Video-LLaVA-style data, read as <image>
_instruction_tokenizer = functools.lru_cache(maxsize=4)(load_instruction_tokenizer)  # once per process


@dataclasses.dataclass(frozen=True)
class Decode:
  """record -> training example; picklable for grain worker processes. Fixed shapes:
    pixels [F, S, S, 3] uint8: an image in frame 0, or a video's frames at `fps` (evenly
      thinned to F = max_frames if more), each resized as CLIPImageProcessor does (an image padded
      to a square first with `data.image_aspect_ratio` "pad", `video.image_resize`); then zeros.
      The normalising happens on the device (`normalized`);
    num_frames [] int32: n, the real frames;
    instruction_ids, instruction_mask [R, L_t] int32: turn r's instruction for the Q-Former (its
      question without the media mark and newlines; BERT tokens cut from the left), R = max_turns,
      L_t = max_instruction_len; rows past the example's turns are zeros;
    input_ids, labels, attention_mask [L] int32, L = max_len, right-padded, labels -100 where
      nothing is learned. Each turn's `<image>` is a run of n * tokens_per_frame placeholders.
  Texts (BOS first):
    caption:      "<image>" + answer + "\\n" (the reference's plain_guided), the answer learned;
                  the record must hold one question and its answer.
    conversation: the template's training format (`conv_lib.training_pieces`; vicuna_v1 is the
                  reference's imgsp_v1) with the media in
                  every question (imgsp_v1): a question that has the mark gets it in front (as
                  LLaVA's preprocessing moves it), the others in front or at the end at random
                  (seeded by the record, so an example is the same every epoch); questions past
                  max_turns are dropped with their answers.
  A text-only record (conversation format only) has n = 0, zero pixels and instruction rows, and
  its turns as they are: no media mark, nothing spliced (the reference's text-only samples).
  A long video (`text(..., movie)`, `FeatureFileDecode`) takes the place of its question's one
  mark: each of its n frames a run of tokens_per_frame placeholders, with the frame's subtitles
  after it; the other turns stay text, and its one instruction is that question without the mark
  (newlines kept), as the reference reads its long-video data.
  The text is cut at max_text_len with each placeholder counted once (the reference's collator),
  then the runs are expanded and the result cut at max_len.
  """
  tokenizer_dir: str
  instruction_tokenizer_dir: str
  text_format: str
  max_text_len: int
  max_len: int
  max_frames: int
  max_turns: int
  max_instruction_len: int
  image_size: int
  fps: float
  image_token_id: int
  tokens_per_frame: int
  template: str = "vicuna_v1"
  image_resize: str = "short_side_crop"  # or "pad": images padded to a square first

  def __call__(self, record: datasets.Record) -> dict[str, np.ndarray]:
    pixels, n = self.frames(record)
    example = self.text(record, n)
    example["pixels"], example["num_frames"] = pixels, np.int32(n)
    return example

  def media_inputs(self, record: datasets.Record) -> tuple[dict[str, np.ndarray], dict]:
    """For a feature cache: ({frame: its n frames [n, S, S, 3] uint8}, {}); nothing for a text-only record."""
    if record["kind"] == "text":
      return {}, {}
    pixels, n = self.frames(record)
    return {"frame": pixels[:n]}, {}

  def text(self, record: datasets.Record, n: int, movie: long_video.LongVideo | None = None) -> dict[str, np.ndarray]:
    """The example's text arrays (input_ids, labels, attention_mask, instruction_ids,
    instruction_mask), its media (if any) of n frames (those of `movie`, a long video, if given)."""
    messages = [dict(m, value=m["value"].replace(VIDEO_MARKER, IMAGE_TOKEN)) for m in record["conversation"]]
    with_media = record["kind"] != "text"
    if movie is not None:
      pieces, instructions = self.movie_conversation(messages, movie)
    else:
      if self.text_format == "caption":
        if not with_media:
          raise ValueError("a caption example needs media; this record is text-only")
        pieces, questions = self.caption(messages)
      else:
        pieces, questions = self.conversation(messages, with_media)
      # The reference's instruction: the question without the media mark and newlines.
      instructions = [q.replace(IMAGE_TOKEN, "").replace("\n", "") for q in questions]
    tokenizer = LlamaVidSystem.training_tokenizer(self.tokenizer_dir)
    ids, labels = conv_lib.encode_text(tokenizer, pieces, {IMAGE_TOKEN: (-1, 1)})
    ids, labels = ids[:self.max_text_len], labels[:self.max_text_len]
    if not with_media and -1 in ids:
      raise ValueError("a text-only record holds a media mark")
    if with_media and ids.count(-1) < (n if movie is not None else 1):
      raise ValueError(f"the media of {record['media']} lie past max_text_len {self.max_text_len}")
    run = self.tokens_per_frame if movie is not None else n * self.tokens_per_frame  # per mark: a frame of a movie
    expanded_ids, expanded_labels = [], []
    for token, label in zip(ids, labels):
      expanded_ids += [self.image_token_id] * run if token == -1 else [token]
      expanded_labels += [conv_lib.IGNORE_INDEX] * run if token == -1 else [label]
    text = [(expanded_ids[:self.max_len], expanded_labels[:self.max_len])]
    example = {k: v[0] for k, v in conv_lib.collate(text, multiple=self.max_len).items()}

    instruction = _instruction_tokenizer(self.instruction_tokenizer_dir)
    example["instruction_ids"] = np.zeros((self.max_turns, self.max_instruction_len), np.int32)
    example["instruction_mask"] = np.zeros((self.max_turns, self.max_instruction_len), np.int32)
    for r, text in enumerate(instructions):
      row = instruction(text, truncation=True, max_length=self.max_instruction_len).input_ids
      example["instruction_ids"][r, :len(row)] = row
      example["instruction_mask"][r, :len(row)] = 1
    return example

  def frames(self, record: datasets.Record) -> tuple[np.ndarray, int]:
    """-> (pixels [max_frames, S, S, 3] uint8, the frames then zeros; the number of frames: 0 for
    a text-only record)."""
    if record["kind"] == "text":
      frames = np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
    elif record["kind"] == "image":
      frames = video_lib.image_pixels(record["media"], self.image_size, resize=self.image_resize)[None]
    else:
      stream = video_lib.FrameStream(record["media"], self.fps, self.max_frames)
      frames = stream.pixels(np.arange(len(stream)), self.image_size)
    pixels = np.zeros((self.max_frames, self.image_size, self.image_size, 3), np.uint8)
    pixels[:len(frames)] = frames
    return pixels, len(frames)

  def caption(self, messages: list[dict[str, str]]) -> tuple[list[tuple[str, bool]], list[str]]:
    """-> (the caption text as [(piece, learned)], [its question])."""
    if len(messages) != 2 or (messages[0]["from"], messages[1]["from"]) != ("human", "gpt"):
      raise ValueError(f"a caption example is one human question and one gpt answer, got "
                       f"{[m['from'] for m in messages]}")
    return [(IMAGE_TOKEN, False), (messages[1]["value"] + "\n", True)], [messages[0]["value"]]

  def conversation(self, messages: list[dict[str, str]],
                   with_media: bool = True) -> tuple[list[tuple[str, bool]], list[str]]:
    """-> (the conversation text as [(piece, learned)], its questions, each with the media mark).
    Without media: every turn as it is (max_turns bounds only the questions read with media), and
    no questions."""
    if len(messages) < 2 or len(messages) % 2:
      raise ValueError(f"expected alternating human/gpt messages, got {len(messages)}")
    rng = np.random.default_rng(zlib.crc32(repr(messages).encode()))
    pairs = list(zip(messages[::2], messages[1::2]))
    turns = []
    for question, answer in pairs[:self.max_turns] if with_media else pairs:
      if (question["from"], answer["from"]) != ("human", "gpt"):
        raise ValueError(f"expected a human then a gpt message, got {question['from']}, {answer['from']}")
      text = question["value"]
      if with_media:
        if IMAGE_TOKEN in text:
          text = IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()
        elif rng.integers(2) == 0:
          text = IMAGE_TOKEN + "\n" + text
        else:
          text = text + "\n" + IMAGE_TOKEN
      turns.append((text, answer["value"]))
    pieces = conv_lib.training_pieces(conv_lib.get_template(self.template), turns)
    return pieces, [q for q, _ in turns] if with_media else []

  def movie_conversation(self, messages: list[dict[str, str]],
                         movie: long_video.LongVideo) -> tuple[list[tuple[str, bool]], list[str]]:
    """-> (the conversation text as [(piece, learned)], with the movie's frames and subtitles in
    place of its question's mark; [that question's instruction])."""
    marked = [m for m in messages if IMAGE_TOKEN in m["value"]]
    if len(marked) != 1 or marked[0]["from"] != "human" or marked[0]["value"].count(IMAGE_TOKEN) != 1:
      raise ValueError("a long video's conversation marks the video once, in a question")
    instruction = marked[0]["value"].replace(IMAGE_TOKEN, "").strip()
    subtitled = movie.prompt().replace("...", "")  # as the reference trains on them
    pieces, _ = self.conversation([dict(m, value=m["value"].replace(IMAGE_TOKEN, subtitled)) for m in messages],
                                  with_media=False)
    return pieces, [instruction]


@dataclasses.dataclass(frozen=True)
class CachedDecode:
  """record (with its `cache_index`) -> the example `decode` gives, frame_features
  [max_frames, 1+G*G, D] (the ViT's dtype) from the cache's `files` (its n frames' ViT features, then zeros)
  in place of its pixels. A record whose media could not be read when the cache was made raises,
  as its decode did."""
  decode: Decode
  files: tuple[str, ...]
  shape: tuple[int, int]  # a frame's [1+G*G, D]
  dtype: str              # the ViT's

  def __call__(self, record: datasets.Record) -> dict[str, np.ndarray]:
    features = np.zeros((self.decode.max_frames, *self.shape), jnp.dtype(self.dtype))
    n = 0
    if record["kind"] != "text":
      cached = feature_cache.entry(self.files, record)["frame_features"]
      n = len(cached)
      features[:n] = cached
    example = self.decode.text(record, n)
    example["frame_features"], example["num_frames"] = features, np.int32(n)
    return example


@dataclasses.dataclass(frozen=True)
class FeatureFileDecode:
  """record -> the example `decode` gives for a long video whose media is a feature file
  (`long_video.load`, thinned to max_frames): frame_features [max_frames, G*G, D] (its n frames'
  features in the ViT's dtype, then zeros) in place of pixels, its subtitles in the text. Text-only
  records as `decode` gives them; an image (or a video file) raises."""
  decode: Decode
  shape: tuple[int, int]  # a frame's [G*G, D]
  dtype: str              # the ViT's

  def __call__(self, record: datasets.Record) -> dict[str, np.ndarray]:
    features = np.zeros((self.decode.max_frames, *self.shape), jnp.dtype(self.dtype))
    movie = None
    if record["kind"] == "image":
      raise ValueError(f"{record['media']} is an image: with data.video_features the data are long videos' "
                       "feature files")
    if record["kind"] == "video":
      try:
        movie = long_video.load(record["media"])
      except ValueError as e:
        raise ValueError(f"{e} (data.video_features: videos are feature files; False for video files)") from None
      movie = checked_features(movie.thinned(self.decode.max_frames), record["media"], self.shape)
      features[:len(movie)] = movie.features
    n = 0 if movie is None else len(movie)
    example = self.decode.text(record, n, movie)
    example["frame_features"], example["num_frames"] = features, np.int32(n)
    return example
