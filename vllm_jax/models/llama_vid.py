"""LLaMA-VID: every frame becomes two LLM tokens, a context token read by the user's instruction
and a content token pooled from the frame.

  frames [N, H, W, 3] --vision (EVA ViT-g, all 1+G*G tokens)--> features [N, 1+G*G, D]   (`encode_frames`)
  features --att_norm--> Q-Former with the instruction [N, L] after its queries --> [N, Q, 768]
      --att_projector--> text queries [N, Q, D]
  vis = features without CLS [N, G*G, D] (long videos' feature files come without it)
  context = mean over the Q queries of softmax(text queries . key_projector(vis)^T / sqrt(D)) . vis
      --val_projector--> [N, 1, E]
  content = vis mean-pooled (one token) or average-pooled on a k x k grid --projector--> [N, 1 or k*k, E]
  frame tokens = [context, content...]                                                   (`frame_tokens`)
  input_ids [B, L]: text with placeholder runs (`image_token_id` x frames * tokens_per_frame)
  --embed, the k-th placeholder of a row replaced by that row's k-th media token--> --Llama--> logits

The vision features do not depend on the text, so a video is encoded once (in chunks of frames)
and a new question re-runs only `frame_tokens`. An image is a one-frame video.

Parameters: vision/... (`vit.ViT`), att_norm/{scale, bias} [D], qformer/... (`qformer.QFormer`
with its text path), att_projector/{kernel [768, D], bias}, key_projector/{kernel [D, D], bias},
val_projector/{kernel [D, E], bias}, projector/{fc1 [D, E], fc2 [E, E]}/{kernel, bias}, llm/...
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllm_jax.models.llama import KVCache, Llama, LlamaConfig
from vllm_jax.models.qformer import QFormer, QFormerConfig
from vllm_jax.models.video_llama import embed_with_media
from vllm_jax.models.video_llava import Projector
from vllm_jax.models.vit import EVA_VIT_G, ViT, ViTConfig
from vllm_jax.nn.config import ConfigBase
from vllm_jax.nn.layers import Dense, LayerNorm, constrain

# The text-guided Q-Former: BLIP-2's, reading EVA features, with bert-base-uncased's vocabulary
# grown by `[DEC]` (30,523 words).
INSTRUCT_QFORMER = QFormerConfig(vocab_size=30523, max_position_embeddings=512)


@dataclasses.dataclass(frozen=True)
class LlamaVidConfig(ConfigBase):
  llama: LlamaConfig = LlamaConfig()
  vit: ViTConfig = EVA_VIT_G
  qformer: QFormerConfig = INSTRUCT_QFORMER
  att_norm_eps: float = 1e-5        # torch's LayerNorm default (`vlm_att_ln`)
  content_grid: int = 0             # 0: one mean-pooled content token; k: a k x k grid of them
  image_token_id: int = 32000       # <image>: one run per media item, frames * tokens_per_frame long
  fps: float = 1.0                  # video frames sampled per second
  max_instruction_len: int = 256    # BERT tokens of an instruction (cut from the left, as the reference)
  chunk_frames: int = 64            # frames encoded at once (long videos run chunk by chunk)
  template: str = "vicuna_v1"       # conversation template (`vllm_jax.data.conversation`): LLaMA-VID's
  # Training (`systems.llama_vid.media_tokens`): what each question's pass of the text-guided part
  # over a batch's frames keeps for the backward pass, a jax.checkpoint_policies name ("none": all
  # of it). "nothing_saveable" keeps its inputs and reruns one question at a time in the backward.
  context_remat_policy: str = "none"

  def __post_init__(self):
    if self.qformer.encoder_width != self.vit.width:
      raise ValueError(f"qformer.encoder_width {self.qformer.encoder_width} != vit.width {self.vit.width}")
    if self.qformer.vocab_size <= 0:
      raise ValueError("LLaMA-VID's Q-Former reads the instruction: set qformer.vocab_size")
    if self.content_grid < 0 or self.content_grid > self.vit.grid:
      raise ValueError(f"content_grid {self.content_grid} must lie in 0..{self.vit.grid} (the patch grid)")

  @property
  def pool_stride(self) -> int:
    """Kernel and stride of the content grid's average pooling (the reference's G // k)."""
    return self.vit.grid // self.content_grid if self.content_grid else self.vit.grid

  @property
  def tokens_per_frame(self) -> int:
    """One context token and the content tokens."""
    return 1 + (self.vit.grid // self.pool_stride) ** 2


class LlamaVid(nn.Module):
  """`__call__` -> (logits [B, L, V], updated cache or None)."""
  config: LlamaVidConfig

  def setup(self):
    cfg = self.config
    width, hidden = cfg.vit.width, cfg.llama.hidden_size
    dense = lambda features, axes, name: Dense(features, axes, use_bias=True, dtype=cfg.llama.dtype,
                                               param_dtype=cfg.llama.param_dtype, name=name)
    self.vision = ViT(cfg.vit)
    self.att_norm = LayerNorm(cfg.att_norm_eps, dtype=cfg.qformer.dtype, param_dtype=cfg.qformer.param_dtype)
    self.qformer = QFormer(cfg.qformer)
    self.att_projector = dense(width, ("embed", "mlp"), "att_projector")
    self.key_projector = dense(width, ("embed", "mlp"), "key_projector")
    self.val_projector = dense(hidden, ("mlp", "embed"), "val_projector")
    self.projector = Projector(hidden, dtype=cfg.llama.dtype, param_dtype=cfg.llama.param_dtype)
    self.llm = Llama(cfg.llama)

  def encode_frames(self, frames: jax.Array) -> jax.Array:
    """[N, H, W, 3] -> the ViT's last block [N, 1+G*G, D] (CLS first)."""
    return self.vision(frames)

  def frame_tokens(self, features: jax.Array, text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
    """features [N, 1+G*G, D] (or [N, G*G, D], as long videos' feature files give them) with each
    frame's instruction ids / mask [N, L] -> [N, tokens_per_frame, E]. The Q-Former reads every
    token; the rest, the patches only (the last G*G: CLS, where given, comes first)."""
    queries = self.qformer(self.att_norm(features), text_ids=text_ids, text_mask=text_mask)
    text_queries = self.att_projector(queries)                                # [N, Q, D]
    patches = self.config.vit.grid ** 2
    vis = features[:, features.shape[1] - patches:].astype(text_queries.dtype)  # [N, G*G, D]
    scores = jnp.einsum("nqd,nsd->nqs", text_queries, self.key_projector(vis)) / jnp.sqrt(vis.shape[-1])
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(vis.dtype)
    context = jnp.einsum("nqs,nsd->nd", weights, vis) / weights.shape[1]      # mean over the queries
    # Laid out before val_projector: without it XLA (jax 0.10, CPU) miscompiles the whole
    # program on a (2, 2, 2) mesh when the ViT's scan feeds this projection.
    context = constrain(context, ("batch", "act_embed"))
    context = self.val_projector(context)[:, None]                            # [N, 1, E]
    content = self.projector(self._pool(vis))                                 # [N, k*k, E]
    return constrain(jnp.concatenate([context, content], axis=1), ("batch", "length", "act_embed"))

  def _pool(self, vis: jax.Array) -> jax.Array:
    """[N, G*G, D] -> [N, (G//s)^2, D]: average pooling with kernel = stride = s (the remainder
    rows and columns dropped, as `avg_pool2d` does); s = G gives the mean."""
    n, g, s = vis.shape[0], self.config.vit.grid, self.config.pool_stride
    out = g // s
    grid = vis.reshape(n, g, g, -1)[:, :out * s, :out * s]
    return grid.reshape(n, out, s, out, s, -1).mean(axis=(2, 4)).reshape(n, out * out, -1)

  def embed(self, input_ids: jax.Array, media_tokens: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, L, E] with media_tokens [B, M, E] (a row's items in prompt order)
    spliced in at the placeholders."""
    return embed_with_media(self.llm, input_ids, {self.config.image_token_id: media_tokens})

  def decode(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
             positions: jax.Array | None = None, cache: KVCache | None = None):
    """The LLM on embeddings [B, L, E] -> (logits [B, L, V], cache)."""
    return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, positions=positions, cache=cache)

  def __call__(self, input_ids: jax.Array, frames: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
               attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
               cache: KVCache | None = None):
    """input_ids: [B, L] with one placeholder run per row; frames: [B, T, H, W, 3]; text_ids,
    text_mask: [B, L_t] each row's instruction; attention_mask: [B, L] (0 = padding)."""
    b, t = frames.shape[:2]
    features = self.encode_frames(frames.reshape(b * t, *frames.shape[2:]))
    repeat = lambda x: jnp.repeat(x, t, axis=0)
    tokens = self.frame_tokens(features, repeat(text_ids), repeat(text_mask))
    x = self.embed(input_ids, tokens.reshape(b, t * tokens.shape[1], -1))
    return self.decode(x, attention_mask, positions, cache)


def init_inputs(config: LlamaVidConfig, batch: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """Input shapes that create every parameter (for `init` / `eval_shape`)."""
  size = config.vit.image_size
  return {"input_ids": jax.ShapeDtypeStruct((batch, 1), jnp.int32),
          "frames": jax.ShapeDtypeStruct((batch, 1, size, size, 3), jnp.float32),
          "text_ids": jax.ShapeDtypeStruct((batch, 1), jnp.int32),
          "text_mask": jax.ShapeDtypeStruct((batch, 1), jnp.int32)}


def abstract_params(config: LlamaVidConfig):
  """The parameters as ShapeDtypeStructs, boxed with their logical axis names."""
  return jax.eval_shape(lambda: LlamaVid(config).init(jax.random.key(0), **{
      k: jnp.zeros(v.shape, v.dtype) for k, v in init_inputs(config).items()}))["params"]


def pack_turn_tokens(tokens: jax.Array, num_frames: jax.Array) -> jax.Array:
  """Each turn's frame tokens -> the media tokens `embed` splices in, in placeholder order.

  tokens [B, R, F, T, E]: row b's T tokens of frame f read with the instruction of turn r, the
  first num_frames[b] [B] frames real. A training row holds one placeholder run per turn, each
  n = num_frames[b] frames x T tokens (frame-major), so its k-th placeholder takes position
  k % (n*T) of turn k // (n*T). -> [B, R*F*T, E]; entries past a row's placeholders are never read
  (a row of 0 frames, text only, has none: its runs count as 1 frame, keeping the indices in range).
  """
  b, r, f, t, e = tokens.shape
  run = jnp.maximum(num_frames[:, None], 1) * t               # [B, 1] placeholders per turn
  k = jnp.arange(r * f * t)[None]                              # [1, R*F*T]
  index = jnp.minimum(k // run, r - 1) * (f * t) + k % run     # [B, R*F*T] into each row's R*F*T tokens
  return jnp.take_along_axis(tokens.reshape(b, r * f * t, e), index[..., None], axis=1)
