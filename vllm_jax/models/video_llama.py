"""Video-LLaMA: the vision branch, the audio branch (optional) and the LLaMA decoder in one model.

  frames [B, T, H, W, 3] --VideoBranch--> video tokens [B, 32, E]
  audio clips [B, N, 1, mel, frames] --AudioBranch--> audio tokens [B, 8, E]
  input_ids [B, L]: text with placeholder runs (`video_token_id` x 32, `audio_token_id` x 8)
  --embed, the k-th placeholder of a row replaced by that row's k-th media token--> [B, L, E]
  --Llama--> logits [B, L, V]

Training from a feature cache (`vllm_jax.data.feature_cache`) splits each branch at its frozen
encoders: `frozen_features` runs them once (frame features [B, T, Q, E] from ViT + ln_vision +
image Q-Former, ImageBind embeddings [B, N, D]); `__call__(frame_features=..., audio_features=...)`
runs only what follows (frame positions, video Q-Former, projections, the LLM): the halves of
`VideoBranch` (`frame_features`, `connect`) and of `AudioBranch`.

Rows may hold different prompts: the placeholders sit anywhere (after left or right padding),
one run per media item; a row without audio placeholders ignores its audio tokens. The
placeholder ids lie outside the LLM vocabulary (added tokens); they are embedded as id 0
before the media tokens replace them.

Parameters: vision/... (`video_branch`), audio/... (`audio_branch`), llm/... (`llama`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllm_jax.models.audio_branch import AudioBranch, AudioBranchConfig
from vllm_jax.models.llama import KVCache, Llama, LlamaConfig
from vllm_jax.models.video_branch import VideoBranch, VideoBranchConfig
from vllm_jax.nn.config import ConfigBase


@dataclasses.dataclass(frozen=True)
class VideoLlamaConfig(ConfigBase):
  llama: LlamaConfig = LlamaConfig()
  vision: VideoBranchConfig = VideoBranchConfig()
  audio: AudioBranchConfig | None = AudioBranchConfig()   # None: a vision-only model
  video_token_id: int = 32000      # <ImageHere>
  audio_token_id: int = 32001      # <AudioHere>
  num_frames: int = 8              # frames sampled per video
  template: str = "vicuna_v0"      # conversation template (`vllm_jax.data.conversation`)

  def __post_init__(self):
    for name, branch in (("vision", self.vision), ("audio", self.audio)):
      if branch is not None and branch.llm_hidden_size != self.llama.hidden_size:
        raise ValueError(f"{name}.llm_hidden_size {branch.llm_hidden_size} != llama.hidden_size "
                         f"{self.llama.hidden_size}")

  @property
  def num_video_tokens(self) -> int:
    return self.vision.video_qformer.num_queries

  @property
  def num_audio_tokens(self) -> int:
    return 0 if self.audio is None else self.audio.qformer.num_queries


def splice(embeds: jax.Array, input_ids: jax.Array, token_id: int, media: jax.Array) -> jax.Array:
  """Replace the k-th `token_id` position of each row by media[row, k].

  embeds: [B, L, E]; input_ids: [B, L]; media: [B, M, E] -> [B, L, E].
  """
  is_media = input_ids == token_id
  k = jnp.clip(jnp.cumsum(is_media, axis=1) - 1, 0, media.shape[1] - 1)
  gathered = jnp.take_along_axis(media.astype(embeds.dtype), k[..., None], axis=1)
  return jnp.where(is_media[..., None], gathered, embeds)


def embed_with_media(llm: Llama, input_ids: jax.Array, media: dict[int, jax.Array | None]) -> jax.Array:
  """Token embeddings [B, L, E] of `input_ids` [B, L], each placeholder id's run replaced by its
  media tokens (`splice`; None: that kind is absent). Placeholder ids may lie outside the LLM
  vocabulary: they are embedded as id 0 first."""
  placeholder = jnp.isin(input_ids, jnp.asarray(list(media)))
  x = llm.embed(jnp.where(placeholder, 0, input_ids))
  for token_id, tokens in media.items():
    if tokens is not None:
      x = splice(x, input_ids, token_id, tokens)
  return x


class VideoLlama(nn.Module):
  """`__call__` -> (logits [B, L, V], updated cache or None)."""
  config: VideoLlamaConfig

  def setup(self):
    cfg = self.config
    self.vision = VideoBranch(cfg.vision)
    self.audio = None if cfg.audio is None else AudioBranch(cfg.audio)
    self.llm = Llama(cfg.llama)

  def encode_video(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
    """[B, T, H, W, 3] (or images [B, H, W, 3]), mask [B, T] -> [B, num_video_tokens, E]."""
    return self.vision(frames, frame_mask)

  def encode_audio(self, clips: jax.Array) -> jax.Array:
    """[B, N, 1, mel, frames] -> [B, num_audio_tokens, E]."""
    if self.audio is None:
      raise ValueError("this model has no audio branch (config.audio is None)")
    return self.audio(clips)

  def frozen_features(self, frames: jax.Array, clips: jax.Array | None = None):
    """What the frozen encoders make of the media, for a feature cache: frames [B, T, H, W, 3]
    -> frame features [B, T, Q, E]; clips [B, N, 1, mel, frames] -> ImageBind embeddings
    [B, N, D] (None without clips). Needs only the encoders' parameters."""
    features = self.vision.frame_features(frames)
    if clips is None:
      return features, None
    return features, self.audio.encoder(clips)

  def encode_video_features(self, features: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
    """Frame features [B, T, Q, E] (`frozen_features`), mask [B, T] -> [B, num_video_tokens, E]:
    `encode_video` without its frozen encoders."""
    return self.vision.connect(features, frame_mask)

  def embed(self, input_ids: jax.Array, video_tokens: jax.Array | None = None,
            audio_tokens: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, L, E] with the media tokens spliced in at their placeholders."""
    cfg = self.config
    return embed_with_media(self.llm, input_ids, {cfg.video_token_id: video_tokens, cfg.audio_token_id: audio_tokens})

  def decode(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
             positions: jax.Array | None = None, cache: KVCache | None = None):
    return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, positions=positions, cache=cache)

  def __call__(self, input_ids: jax.Array, frames: jax.Array | None = None, frame_mask: jax.Array | None = None,
               audio: jax.Array | None = None, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, cache: KVCache | None = None,
               frame_features: jax.Array | None = None, audio_features: jax.Array | None = None):
    """input_ids: [B, L] with placeholder runs; frames: [B, T, H, W, 3]; frame_mask: [B, T];
    audio: [B, N, 1, mel, frames] or None (no row has audio); attention_mask: [B, L].
    Cached media instead of frames / audio (`frozen_features`): frame_features [B, T, Q, E],
    audio_features [B, N, D]."""
    x = self.embed_inputs(input_ids, frames, frame_mask, audio, frame_features, audio_features)
    return self.decode(x, attention_mask, positions, cache)

  def embed_inputs(self, input_ids: jax.Array, frames: jax.Array | None = None, frame_mask: jax.Array | None = None,
                   audio: jax.Array | None = None, frame_features: jax.Array | None = None,
                   audio_features: jax.Array | None = None) -> jax.Array:
    """The LLM's input embeddings [B, L, E] of `__call__`'s inputs: media encoded and spliced in."""
    if frame_features is not None:
      video_tokens = self.encode_video_features(frame_features, frame_mask)
    else:
      video_tokens = None if frames is None else self.encode_video(frames, frame_mask)
    if audio_features is not None:
      audio_tokens = self.audio.connect(audio_features)
    else:
      audio_tokens = None if audio is None else self.encode_audio(audio)
    return self.embed(input_ids, video_tokens, audio_tokens)


def init_inputs(config: VideoLlamaConfig, batch: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """Input shapes that create every parameter (for `init` / `eval_shape`)."""
  size = config.vision.vit.image_size
  inputs = {"input_ids": jax.ShapeDtypeStruct((batch, 1), jnp.int32),
            "frames": jax.ShapeDtypeStruct((batch, 1, size, size, 3), jnp.float32)}
  if config.audio is not None:
    enc = config.audio.encoder
    inputs["audio"] = jax.ShapeDtypeStruct((batch, 1, 1, enc.num_mel_bins, enc.num_frames), jnp.float32)
  return inputs


def abstract_params(config: VideoLlamaConfig):
  """The parameters as ShapeDtypeStructs, boxed with their logical axis names."""
  return jax.eval_shape(lambda: VideoLlama(config).init(jax.random.key(0), **{
      k: jnp.zeros(v.shape, v.dtype) for k, v in init_inputs(config).items()}))["params"]
