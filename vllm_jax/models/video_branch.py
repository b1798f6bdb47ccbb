"""Video-LLaMA's vision-language branch: frames -> a fixed number of LLM-space tokens.

  frames [B, T, H, W, 3] --fold--> [B*T, H, W, 3] --ViT--> --ln_vision--> image Q-Former
  -> [B*T, Q, E] --unfold, + frame position--> [B, T*Q, E] --video Q-Former--> [B, Q_v, E]
  --llama_proj--> [B, Q_v, llm_hidden_size]

Frames are channels-last and already normalised (CLIP mean/std). An image is a one-frame video.

Parameters: visual_encoder (ViT), ln_vision/{scale, bias}, qformer (QFormer),
  frame_position_embedding/embedding [max_frames, E], video_qformer (QFormer),
  llama_proj/{kernel [E, llm_hidden_size], bias}.
"""

import dataclasses

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax.models.qformer import QFormer, QFormerConfig
from vllm_jax.models.vit import EVA_VIT_G, ViT, ViTConfig
from vllm_jax.nn.config import ConfigBase
from vllm_jax.nn.layers import Dense, Embed, LayerNorm, constrain


@dataclasses.dataclass(frozen=True)
class VideoBranchConfig(ConfigBase):
  """Defaults: Video-LLaMA (EVA ViT-g/14, BLIP-2 Q-Former, 2-layer video Q-Former, LLaMA-7B width)."""
  vit: ViTConfig = EVA_VIT_G
  qformer: QFormerConfig = QFormerConfig()
  video_qformer: QFormerConfig = QFormerConfig(num_layers=2, encoder_width=768, cross_attention_frequency=1)
  ln_vision_eps: float = 1e-5
  max_frames: int = 32             # entries of the frame position table
  interpolate_frames: bool = False  # opt-in: stretch the table over longer videos
  use_frame_pos: bool = True       # False (an ablation): frames carry no order; the table stays, unused
  llm_hidden_size: int = 4096
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.qformer.encoder_width != self.vit.width:
      raise ValueError(f"qformer.encoder_width {self.qformer.encoder_width} != vit.width {self.vit.width}")
    if self.video_qformer.encoder_width != self.qformer.hidden_size:
      raise ValueError(f"video_qformer.encoder_width {self.video_qformer.encoder_width} != "
                       f"qformer.hidden_size {self.qformer.hidden_size}")


def stretch_frame_table(table: jax.Array, frames: int) -> jax.Array:
  """[M, E] -> [frames, E]: linear interpolation, first and last rows kept (align_corners)."""
  src = np.linspace(0.0, table.shape[0] - 1, frames)
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, table.shape[0] - 1)
  w = jnp.asarray(src - lo, table.dtype)[:, None]
  return table[lo] * (1 - w) + table[hi] * w


class VideoBranch(nn.Module):
  """frames [B, T, H, W, 3] (or images [B, H, W, 3]), frame_mask [B, T] bool (False for padding
  frames) -> [B, Q_v, llm_hidden_size], in two halves: `frame_features` (the frozen encoders, what
  a feature cache stores) and `connect` (what trains)."""
  config: VideoBranchConfig

  def setup(self):
    cfg = self.config
    self.visual_encoder = ViT(cfg.vit)
    self.ln_vision = LayerNorm(cfg.ln_vision_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.qformer = QFormer(cfg.qformer)
    # Trained from scratch, drawn from N(0, 1) as the reference's nn.Embedding is.
    self.frame_position_embedding = Embed(cfg.max_frames, cfg.qformer.hidden_size, axes=("frames", "embed"),
                                          dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                          embedding_init=nn.initializers.normal(1.0))
    self.video_qformer = QFormer(cfg.video_qformer)
    self.llama_proj = Dense(cfg.llm_hidden_size, (None, "embed"), use_bias=True, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype)

  def __call__(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
    return self.connect(self.frame_features(frames), frame_mask)

  def frame_features(self, frames: jax.Array) -> jax.Array:
    """frames [B, T, H, W, 3] (or images [B, H, W, 3]) -> [B, T, Q, E]: ViT, ln_vision and the
    image Q-Former on each frame."""
    if frames.ndim == 4:
      frames = frames[:, None]
    if frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f"expected frames [B, T, H, W, 3] or images [B, H, W, 3], got shape {frames.shape}")
    x = self.ln_vision(self.visual_encoder(einops.rearrange(frames, "b t h w c -> (b t) h w c")))
    return einops.rearrange(self.qformer(x), "(b t) q e -> b t q e", b=frames.shape[0])

  def connect(self, features: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
    """Frame features [B, T, Q, E], frame_mask [B, T] -> [B, Q_v, llm_hidden_size]: frame
    positions added, the video Q-Former over all frames' queries, the projection.

    The frame position table has `max_frames` entries; longer videos raise unless the config
    sets `interpolate_frames=True`, which stretches the table linearly over the T frames.
    """
    cfg = self.config
    num_frames = features.shape[1]
    if num_frames <= cfg.max_frames:
      frame_pos = self.frame_position_embedding(jnp.arange(num_frames))
    elif cfg.interpolate_frames:
      frame_pos = stretch_frame_table(self.frame_position_embedding(jnp.arange(cfg.max_frames)), num_frames)
    else:
      raise ValueError(f"got {num_frames} frames, but the frame position table has {cfg.max_frames} entries; "
                       f"sample at most {cfg.max_frames} frames or set interpolate_frames=True in the config")
    if not cfg.use_frame_pos:
      frame_pos = jnp.zeros_like(frame_pos)
    q = features + frame_pos[None, :, None, :].astype(features.dtype)
    memory = constrain(einops.rearrange(q, "b t q e -> b (t q) e"), ("batch", "length", "act_embed"))
    memory_mask = None if frame_mask is None else jnp.repeat(frame_mask.astype(bool), q.shape[2], axis=1)
    v = self.video_qformer(memory, memory_mask)  # [B, Q_v, E]
    return constrain(self.llama_proj(v), ("batch", "queries", "act_embed"))
