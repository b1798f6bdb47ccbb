"""Video-LLaVA: CLIP ViT-L/14 image and video towers, one shared MLP projector, a LLaMA decoder.

  images [B, H, W, 3] --image_tower (layer -2)--> [B, 1+G*G, D] --drop CLS--> --projector--> [B, G*G, E]
  frames [B, T, H, W, 3] --video_tower (layer -2, per frame)--> [B*T, 1+G*G, D] --projector-->
      [B, T*(1+G*G), E] (row-major: frame 0's tokens first, CLS kept)
  input_ids [B, L]: text with placeholder runs (`image_token_id` x G*G, `video_token_id` x T*(1+G*G))
  --embed, the k-th placeholder of a row replaced by that row's k-th media token--> [B, L, E]
  --Llama--> logits [B, L, V]

The towers hold only the layers up to the feature layer (-2 of 24: `depth` 23), so their last
block is their output. `video_tower.temporal_frames` 0 is the transformers `-hf` model (a plain
CLIP tower per frame); T > 0 is the original model's LanguageBind video tower, whose every
block first attends across the T frames.

Rows may hold different prompts: placeholders sit anywhere (after left or right padding), one
run per media item; a row without placeholders of a kind ignores that kind's media. Placeholder
ids may lie outside the LLM vocabulary; they are embedded as id 0 before the media replace them.

Parameters: image_tower/..., video_tower/... (`vit.ViT`), projector/{fc1 [D, E], fc2 [E, E]}/
{kernel, bias}, llm/... (`llama.Llama`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllm_jax.models.llama import KVCache, Llama, LlamaConfig
from vllm_jax.models.video_llama import embed_with_media
from vllm_jax.models.vit import CLIP_VIT_L, ViT, ViTConfig
from vllm_jax.nn.config import ConfigBase
from vllm_jax.nn.layers import Dense, constrain, gelu

# Vicuna-7B v1.5 as `LanguageBind/Video-LLaVA-7B-hf` holds it: the vocabulary grown by <image>,
# <video>, <pad> (32000-32002) and padded to a multiple of 64.
VICUNA_7B_V15 = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)


@dataclasses.dataclass(frozen=True)
class VideoLlavaConfig(ConfigBase):
  llama: LlamaConfig = VICUNA_7B_V15
  image_tower: ViTConfig = CLIP_VIT_L
  video_tower: ViTConfig = CLIP_VIT_L  # temporal_frames 0: the `-hf` model; num_frames: LanguageBind's
  image_token_id: int = 32000          # <image>
  video_token_id: int = 32001          # <video>
  num_frames: int = 8                  # frames sampled per video
  template: str = "llava_v1"           # conversation template (`vllm_jax.data.conversation`)

  def __post_init__(self):
    if self.image_tower.width != self.video_tower.width:
      raise ValueError(f"the towers share the projector: image_tower.width {self.image_tower.width} != "
                       f"video_tower.width {self.video_tower.width}")
    if self.video_tower.temporal_frames not in (0, self.num_frames):
      raise ValueError(f"video_tower.temporal_frames {self.video_tower.temporal_frames} must be 0 or "
                       f"num_frames {self.num_frames}")
    if self.image_token_id == self.video_token_id:
      raise ValueError(f"image_token_id and video_token_id are both {self.image_token_id}")

  @property
  def num_image_tokens(self) -> int:
    """Tokens per image: the patch grid (CLS dropped)."""
    return self.image_tower.grid ** 2

  @property
  def num_video_tokens(self) -> int:
    """Tokens per video: every frame's CLS and patches."""
    return self.num_frames * (self.video_tower.grid ** 2 + 1)


class Projector(nn.Module):
  """Linear -> exact GELU -> Linear, x: [..., D] -> [..., E] (images and videos share it)."""
  features: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda axes, name: Dense(self.features, axes, use_bias=True, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    h = gelu(dense(("embed", "mlp"), "fc1")(x))
    return dense(("mlp", "embed"), "fc2")(h)


class VideoLlava(nn.Module):
  """`__call__` -> (logits [B, L, V], updated cache or None)."""
  config: VideoLlavaConfig

  def setup(self):
    cfg = self.config
    self.image_tower = ViT(cfg.image_tower)
    self.video_tower = ViT(cfg.video_tower)
    self.projector = Projector(cfg.llama.hidden_size, dtype=cfg.llama.dtype, param_dtype=cfg.llama.param_dtype)
    self.llm = Llama(cfg.llama)

  def encode_images(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, G*G, E] (the patch tokens of layer -2, projected)."""
    return self.encode_image_features(self.image_features(images))

  def image_features(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> the image tower's patch features [B, G*G, D] (layer -2, CLS dropped): what
    a feature cache holds."""
    return self.image_tower(images)[:, 1:]

  def encode_image_features(self, features: jax.Array) -> jax.Array:
    """`image_features` [B, G*G, D] -> [B, G*G, E]: `encode_images` without its tower."""
    return constrain(self.projector(features), ("batch", "length", "act_embed"))

  def encode_videos(self, frames: jax.Array) -> jax.Array:
    """[B, T, H, W, 3] -> [B, T*(1+G*G), E] (every frame's tokens, CLS first, frame 0 first)."""
    return self.encode_video_features(self.video_features(frames))

  def video_features(self, frames: jax.Array) -> jax.Array:
    """[B, T, H, W, 3] -> the video tower's features [B, T, 1+G*G, D] (layer -2): what a feature
    cache holds."""
    b, t = frames.shape[:2]
    frames_needed = self.config.video_tower.temporal_frames
    if frames_needed and t != frames_needed:
      raise ValueError(f"the video tower attends across {frames_needed} frames; got videos of {t}")
    features = self.video_tower(frames.reshape(b * t, *frames.shape[2:]))
    return features.reshape(b, t, *features.shape[1:])

  def encode_video_features(self, features: jax.Array) -> jax.Array:
    """`video_features` [B, T, 1+G*G, D] -> [B, T*(1+G*G), E]: `encode_videos` without its tower."""
    b, t, n = features.shape[:3]
    tokens = self.projector(features.reshape(b * t, n, -1)).reshape(b, t * n, -1)
    return constrain(tokens, ("batch", "length", "act_embed"))

  def embed(self, input_ids: jax.Array, image_tokens: jax.Array | None = None,
            video_tokens: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, L, E] with the media tokens spliced in at their placeholders.

    image_tokens: [B, n*G*G, E] and video_tokens: [B, n*T*(1+G*G), E] (a row's media items in
    prompt order); the k-th placeholder of a kind in row b takes tokens[b, k].
    """
    cfg = self.config
    return embed_with_media(self.llm, input_ids, {cfg.image_token_id: image_tokens, cfg.video_token_id: video_tokens})

  def decode(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
             positions: jax.Array | None = None, cache: KVCache | None = None):
    """The LLM on embeddings [B, L, E] -> (logits [B, L, V], cache)."""
    return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, positions=positions, cache=cache)

  def __call__(self, input_ids: jax.Array, images: jax.Array | None = None, videos: jax.Array | None = None,
               attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
               cache: KVCache | None = None):
    """input_ids: [B, L] with placeholder runs; images: [B, H, W, 3] (one per row) or None;
    videos: [B, T, H, W, 3] (one per row) or None; attention_mask: [B, L] (0 = padding);
    positions: [B, L] (default: counted over the unmasked tokens)."""
    image_tokens = None if images is None else self.encode_images(images)
    video_tokens = None if videos is None else self.encode_videos(videos)
    x = self.embed(input_ids, image_tokens, video_tokens)
    return self.decode(x, attention_mask, positions, cache)


def init_inputs(config: VideoLlavaConfig, batch: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """Input shapes that create every parameter (for `init` / `eval_shape`)."""
  size, video_size = config.image_tower.image_size, config.video_tower.image_size
  frames = config.video_tower.temporal_frames or 1
  return {"input_ids": jax.ShapeDtypeStruct((batch, 1), jnp.int32),
          "images": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
          "videos": jax.ShapeDtypeStruct((batch, frames, video_size, video_size, 3), jnp.float32)}


def abstract_params(config: VideoLlavaConfig):
  """The parameters as ShapeDtypeStructs, boxed with their logical axis names."""
  return jax.eval_shape(lambda: VideoLlava(config).init(jax.random.key(0), **{
      k: jnp.zeros(v.shape, v.dtype) for k, v in init_inputs(config).items()}))["params"]
