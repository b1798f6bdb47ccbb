"""Video-LLaMA's audio-language branch: audio clips -> a few LLM-space tokens.

  clips [B, N, 1, mel, frames] -> ImageBind audio encoder (frozen) -> [B, N, 1024]
  -> + audio position embedding [N_max, 1024] (clip order)
  -> Audio Q-Former (2 BERT layers, cross-attention in both, 8 queries) -> [B, 8, 768]
  -> audio_llama_proj [768 -> llm_hidden_size] (with bias) -> [B, 8, llm_hidden_size]

A sample without usable audio (`vllm_jax.data.audio` returns `valid=False` and zero clips) still
runs through the branch; the caller leaves its tokens out (or masks them), and a batch without
any audio skips the branch altogether: nothing else in the model depends on it.

Parameters: encoder/... (see `imagebind_audio`), position_embedding/embedding [N_max, 1024],
qformer/... (see `qformer`, including query_tokens [8, 768]), llama_proj/{kernel [768, H], bias [H]}.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllm_jax.models.imagebind_audio import ImageBindAudio, ImageBindAudioConfig
from vllm_jax.models.qformer import QFormer, QFormerConfig
from vllm_jax.nn.config import ConfigBase
from vllm_jax.nn.layers import Dense, Embed, constrain

AUDIO_QFORMER = QFormerConfig(num_layers=2, cross_attention_frequency=1, encoder_width=1024, num_queries=8)


@dataclasses.dataclass(frozen=True)
class AudioBranchConfig(ConfigBase):
  encoder: ImageBindAudioConfig = ImageBindAudioConfig()
  qformer: QFormerConfig = AUDIO_QFORMER
  max_clips: int = 8                 # rows of the audio position embedding
  llm_hidden_size: int = 4096
  freeze_encoder: bool = True        # Video-LLaMA never trains ImageBind: no gradient through it
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.qformer.encoder_width != self.encoder.out_dim:
      raise ValueError(f"qformer.encoder_width {self.qformer.encoder_width} != encoder.out_dim "
                       f"{self.encoder.out_dim}")


class AudioBranch(nn.Module):
  """`__call__`: clips [B, N, 1, mel, frames] -> [B, num_queries, llm_hidden_size].
  `connect`: precomputed ImageBind embeddings [B, N, out_dim] -> the same tokens."""
  config: AudioBranchConfig

  def setup(self):
    cfg = self.config
    self.encoder = ImageBindAudio(cfg.encoder)
    # Trained from scratch, drawn from N(0, 1) as the reference's nn.Embedding is.
    self.position_embedding = Embed(cfg.max_clips, cfg.encoder.out_dim, axes=(None, "embed"), dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype, embedding_init=nn.initializers.normal(1.0))
    self.qformer = QFormer(cfg.qformer)
    self.llama_proj = Dense(cfg.llm_hidden_size, (None, "embed"), use_bias=True, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype)

  def __call__(self, clips: jax.Array, train: bool = False) -> jax.Array:
    embeddings = self.encoder(clips, train=train and not self.config.freeze_encoder)
    if self.config.freeze_encoder:
      embeddings = jax.lax.stop_gradient(embeddings)
    return self.connect(embeddings)

  def connect(self, embeddings: jax.Array) -> jax.Array:
    num_clips = embeddings.shape[1]
    if num_clips > self.config.max_clips:
      raise ValueError(f"{num_clips} clips, but the position embedding has {self.config.max_clips} rows")
    x = embeddings.astype(self.config.dtype) + self.position_embedding(jnp.arange(num_clips))[None]
    x = constrain(x, ("batch", "frames", "act_embed"))
    tokens = self.llama_proj(self.qformer(x))
    return constrain(tokens, ("batch", "queries", "act_embed"))
