"""Vision Transformer with absolute position embeddings: EVA-CLIP ViT-g/14 (BLIP-2), OpenAI CLIP
ViT-L/14 (Video-LLaVA's image tower) and LanguageBind's video tower (CLIP plus temporal attention).

Images are channels-last, [N, H, W, 3]. Pre-norm blocks: x + attn(norm1(x)), x + mlp(norm2(x)).
EVA's attention has biases on q and v only (`qkv_bias=(True, False, True)`); CLIP has all three,
no patch bias, a LayerNorm before the blocks (`pre_norm`) and quick-GELU.
With `temporal_frames` T, N = B*T (each video's frames contiguous) and every block first runs
LanguageBind's temporal step: x += temporal_embedding[frame]; x = x + temporal_attn(temporal_norm(x))
with the attention across the T frames of each token position (CLS included), no temporal MLP.

Parameters (blocks scanned: each block tensor has a leading `layers` axis L):
  patch_embed/{kernel [p, p, 3, D], bias [D] (with `patch_bias`)}; cls_token [D]; pos_embed [1 + G*G, D]
  pre_norm/{scale, bias} [D] (with `pre_norm`)
  blocks/{norm1, norm2}/{scale, bias} [L, D]
  blocks/attn/{query, key, value}/kernel [L, D, H, Dh], {query, key, value}/bias [L, H, Dh] (as
    `qkv_bias` says), out/{kernel [L, H, Dh, D], bias [L, D]}
  blocks/mlp/{fc1 [L, D, M], fc2 [L, M, D]}/{kernel, bias}
  with `temporal_frames` T: blocks/temporal_embedding [L, T, D], blocks/temporal_norm/{scale, bias}
    [L, D], blocks/temporal_attn/ as blocks/attn/ (q, k and v biases)
  norm/{scale, bias} [D] (with `final_norm`)
G = image_size // patch_size is the grid the position table was trained for; other input
sizes get the table resized bicubically (as torch's `interpolate(mode='bicubic')` does).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax.nn.attention import MultiHeadAttention
from vllm_jax.nn.config import ConfigBase
from vllm_jax.nn.layers import Dense, LayerNorm, Mlp, constrain, gelu


ACTIVATIONS = {
    "gelu": gelu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
}


@dataclasses.dataclass(frozen=True)
class ViTConfig(ConfigBase):
  """Defaults: EVA-CLIP ViT-g/14 as BLIP-2 uses it (the 40th block of EVA-g dropped)."""
  image_size: int = 224            # the size the position table is stored for
  patch_size: int = 14
  width: int = 1408
  depth: int = 39
  num_heads: int = 16
  mlp_dim: int = 6144
  layer_norm_eps: float = 1e-6
  qkv_bias: tuple[bool, bool, bool] = (True, False, True)
  patch_bias: bool = True
  pre_norm: bool = False           # CLIP's `pre_layrnorm`, after the positions are added
  activation: str = "gelu"         # a key of ACTIVATIONS
  temporal_frames: int = 0         # >0: LanguageBind's temporal attention over videos of this many frames
  final_norm: bool = False
  pos_embed_init_std: float = 0.02  # a random, frozen ViT needs ~1 for positions to outweigh patch content
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"       # a jax.checkpoint_policies name, or "none"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")


EVA_VIT_G = ViTConfig()
# Video-LLaVA's towers use the hidden state of layer -2 of 24: the last layer is not part of the model.
CLIP_VIT_L = ViTConfig(image_size=224, patch_size=14, width=1024, depth=23, num_heads=16, mlp_dim=4096,
                       layer_norm_eps=1e-5, qkv_bias=(True, True, True), patch_bias=False, pre_norm=True,
                       activation="quick_gelu")


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of torch's bicubic resize (A = -0.75, align_corners=False,
  edge-clamped), so that resizing is a matrix product."""
  a = -0.75
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1       # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  m = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    src = (o + 0.5) * in_size / out_size - 0.5
    base = int(np.floor(src))
    t = src - base
    for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      m[o, min(max(base + offset, 0), in_size - 1)] += w
  return m.astype(np.float32)


def resize_pos_embed(pos: jax.Array, grid: int, new_grid: tuple[int, int]) -> jax.Array:
  """pos: [1 + grid*grid, D] (CLS first) -> [1 + h*w, D] for the new (h, w) patch grid."""
  table = pos[1:].reshape(grid, grid, -1)
  table = jnp.einsum("yg,ghd,xh->yxd", bicubic_matrix(grid, new_grid[0]), table,
                     bicubic_matrix(grid, new_grid[1]), precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos[:1], table.reshape(-1, pos.shape[-1])], axis=0)


class Block(nn.Module):
  """Pre-norm encoder block, x: [N, S, D] -> [N, S, D]; the (carry, _) signature suits `nn.scan`."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x, _):
    cfg = self.config
    norm = lambda name: LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    attention = lambda name, qkv_bias: MultiHeadAttention(
        cfg.num_heads, cfg.head_dim, qkv_bias=qkv_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    if cfg.temporal_frames:
      t = cfg.temporal_frames
      embed = self.param("temporal_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.width ** -0.5), ("frames", "embed")), (t, cfg.width), cfg.param_dtype)
      n, s, d = x.shape
      # One sequence of T frames per (video, token position): [B*S, T, D].
      x = x.reshape(n // t, t, s, d).swapaxes(1, 2).reshape(-1, t, d)
      if t > 1:  # LanguageBind adds no temporal embedding to single frames
        x = x + embed.astype(x.dtype)
      x = x + attention("temporal_attn", (True, True, True))(norm("temporal_norm")(x))
      x = x.reshape(n // t, s, t, d).swapaxes(1, 2).reshape(n, s, d)
    x = x + attention("attn", cfg.qkv_bias)(norm("norm1")(x))
    x = x + Mlp(cfg.mlp_dim, activation=ACTIVATIONS[cfg.activation], dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, name="mlp")(norm("norm2")(x))
    return constrain(x, ("batch", "length", "act_embed")), None


class ViT(nn.Module):
  """images [N, H, W, 3] -> tokens [N, 1 + (H/p)(W/p), D] (CLS first).

  With `temporal_frames` T, N = B*T: row n is frame n % T of video n // T.
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    n, h, w, c = images.shape
    p = cfg.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    if cfg.temporal_frames and n % cfg.temporal_frames:
      raise ValueError(f"{n} images are not whole videos of temporal_frames={cfg.temporal_frames}")
    # A stride-p convolution is a matmul over non-overlapping [p, p, c] patches.
    patches = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, (h // p) * (w // p), p, p, c)
    x = Dense(cfg.width, (None, None, None, "embed"), in_dims=3, use_bias=cfg.patch_bias, dtype=cfg.dtype,
              param_dtype=cfg.param_dtype, name="patch_embed")(patches)

    cls = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                     (cfg.width,), cfg.param_dtype)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(cfg.pos_embed_init_std),
                                                                (None, "embed")),
                     (1 + cfg.grid * cfg.grid, cfg.width), cfg.param_dtype)
    if (h // p, w // p) != (cfg.grid, cfg.grid):
      pos = resize_pos_embed(pos, cfg.grid, (h // p, w // p))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, cfg.width)), x], axis=1)
    x = x + pos.astype(x.dtype)
    if cfg.pre_norm:
      x = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="pre_norm")(x)
    x = constrain(x, ("batch", "length", "act_embed"))

    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=getattr(jax.checkpoint_policies, cfg.remat_policy), prevent_cse=False)
    x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.depth,
                   metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="blocks")(x, None)
    if cfg.final_norm:
      x = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(x)
    return x
