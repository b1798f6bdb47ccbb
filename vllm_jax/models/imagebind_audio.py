"""ImageBind's audio encoder: log-mel clips -> one unit-norm (times the logit scale) embedding each.

  clips [..., 1, mel, frames] -> conv stem (no bias) -> patches [P, W] -> LayerNorm (eps 1e-5)
  -> prepend CLS -> + learned position embedding [1 + P, W]
  -> pre-norm blocks: x + attn(LN(x)), x + mlp(LN(x)); the attention appends one learned key/value
     token (torch's `add_bias_kv`); drop path linspace(0, drop_path) over the blocks, train only
  -> LayerNorm (eps 1e-6) -> CLS -> head [W -> out_dim] (no bias)
  -> L2 normalise * min(exp(log_logit_scale), max_logit_scale)  -> [..., out_dim]

ImageBind-Huge: 128 x 204 inputs, kernel 16, stride 10 -> 12 x 19 = 228 patches, width 768,
12 blocks of 12 heads, MLP 3072, out_dim 1024, logit scale 20 (a fixed buffer: no gradient).

Parameters (blocks scanned, leading `layers` axis L):
  stem/kernel [k, k, 1, W]; stem_norm/{scale, bias} [W]; cls_token [W]; pos_embed [1 + P, W]
  blocks/{norm_1, norm_2}/{scale, bias} [L, W]
  blocks/attn/{query, key, value}/{kernel [L,W,H,D], bias [L,H,D]}, out/{kernel [L,H,D,W], bias [L,W]},
  blocks/attn/{bias_k, bias_v} [L, H, D]; blocks/mlp/{fc1 [L,W,M], fc2 [L,M,W]}/{kernel, bias}
  head_norm/{scale, bias} [W]; head/kernel [W, out_dim]; log_logit_scale []
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllm_jax.nn.attention import MultiHeadAttention
from vllm_jax.nn.config import ConfigBase
from vllm_jax.nn.layers import Dense, LayerNorm, Mlp, constrain


@dataclasses.dataclass(frozen=True)
class ImageBindAudioConfig(ConfigBase):
  num_mel_bins: int = 128
  num_frames: int = 204
  kernel_size: int = 16
  stride: int = 10
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  out_dim: int = 1024
  drop_path: float = 0.1            # of the last block; linearly from 0 at the first
  logit_scale: float = 20.0         # initial value of the (frozen) scale
  max_logit_scale: float = 100.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"        # a jax.checkpoint_policies name, or "none"

  @property
  def grid(self) -> tuple[int, int]:
    return ((self.num_mel_bins - self.kernel_size) // self.stride + 1,
            (self.num_frames - self.kernel_size) // self.stride + 1)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")


def drop_path(x: jax.Array, rate: jax.Array, rng: jax.Array) -> jax.Array:
  """Stochastic depth: zero the residual branch of whole samples with probability `rate`
  and rescale the kept ones by 1 / (1 - rate). x: [B, ...]; rate: [] (may be traced)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.maximum(keep, 1e-6).astype(x.dtype), 0).astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block; (x [B, T, W], drop rate []) -> (x, None) to suit `nn.scan`."""
  config: ImageBindAudioConfig
  train: bool = False

  @nn.compact
  def __call__(self, x, rate):
    cfg = self.config
    norm = lambda name: LayerNorm(1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    residual = lambda h: drop_path(h, rate, self.make_rng("dropout")) if self.train else h
    h = MultiHeadAttention(cfg.num_heads, cfg.head_dim, add_bias_kv=True, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, name="attn")(norm("norm_1")(x))
    x = x + residual(h)
    h = Mlp(cfg.mlp_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="mlp")(norm("norm_2")(x))
    x = x + residual(h)
    return constrain(x, ("batch", "length", "act_embed")), None


class ImageBindAudio(nn.Module):
  """clips [..., 1, num_mel_bins, num_frames] -> embeddings [..., out_dim].

  `train=True` applies drop path and needs a 'dropout' rng.
  """
  config: ImageBindAudioConfig

  @nn.compact
  def __call__(self, clips: jax.Array, train: bool = False) -> jax.Array:
    cfg = self.config
    lead = clips.shape[:-3]
    if clips.shape[-3:] != (1, cfg.num_mel_bins, cfg.num_frames):
      raise ValueError(f"clips must end in (1, {cfg.num_mel_bins}, {cfg.num_frames}), got {clips.shape}")
    x = clips.reshape(-1, cfg.num_mel_bins, cfg.num_frames, 1).astype(cfg.dtype)
    x = nn.Conv(cfg.width, (cfg.kernel_size,) * 2, (cfg.stride,) * 2, padding="VALID", use_bias=False,
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="stem",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, None, "embed")))(x)
    x = x.reshape(x.shape[0], cfg.num_patches, cfg.width)  # row-major over (mel, time), as torch flattens
    x = LayerNorm(1e-5, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="stem_norm")(x)

    embed_param = lambda name, shape, axes: self.param(
        name, nn.with_logical_partitioning(nn.initializers.normal(cfg.width ** -0.5), axes),
        shape, cfg.param_dtype).astype(cfg.dtype)
    cls = embed_param("cls_token", (cfg.width,), ("embed",))
    pos = embed_param("pos_embed", (1 + cfg.num_patches, cfg.width), (None, "embed"))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.width)), x], axis=1) + pos
    x = constrain(x, ("batch", "length", "act_embed"))

    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=getattr(jax.checkpoint_policies, cfg.remat_policy), prevent_cse=False)
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=0, length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    rates = jnp.linspace(0.0, cfg.drop_path, cfg.num_layers, dtype=jnp.float32)
    x, _ = blocks(cfg, train, name="blocks")(x, rates)

    x = LayerNorm(1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="head_norm")(x[:, 0])
    x = Dense(cfg.out_dim, ("embed", "mlp"), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="head")(x)
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    log_scale = self.param("log_logit_scale", nn.with_logical_partitioning(
        nn.initializers.constant(math.log(cfg.logit_scale)), ()), (), jnp.float32)
    scale = jnp.minimum(jnp.exp(jax.lax.stop_gradient(log_scale)), cfg.max_logit_scale)
    return (scale * x).astype(cfg.dtype).reshape(*lead, cfg.out_dim)
