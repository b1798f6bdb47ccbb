"""Linen layers whose every parameter carries logical axis names.

Logical names (mapped to mesh axes by the one rules table in `vllm_jax.train.sharding`):
  batch, length, frames, queries, embed, heads, kv_heads, head_dim, mlp, vocab, patch, layers.
Activations use `act_embed` for the model width so that it can stay replicated while the
parameters' `embed` axis is sharded (FSDP).
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Axes = tuple[str | None, ...]
Dtype = Any
Initializer = Callable[..., jax.Array]


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Sharding constraint by logical names; a no-op without a mesh and rules in context."""
  return nn.with_logical_constraint(x, axes)


def fan_in_init(in_dims: int, ndim: int) -> Initializer:
  """LeCun-normal over a kernel whose first `in_dims` axes are its inputs."""
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal",
      in_axis=tuple(range(in_dims)), out_axis=tuple(range(in_dims, ndim)))


class Dense(nn.Module):
  """Linear map of the trailing `in_dims` axes of x onto `features` (int or shape).

  x: [..., *in_shape] -> [..., *features]; kernel: [*in_shape, *features], named `kernel_axes`.
  With `lora`, a low-rank update beside the kernel (`vllm_jax.nn.lora`).
  """
  features: int | Sequence[int]
  kernel_axes: Axes
  in_dims: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer | None = None
  lora: Any = None  # a `vllm_jax.nn.lora.LoraConfig`, or None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    shape = (*in_shape, *features)
    init = self.kernel_init or fan_in_init(self.in_dims, len(shape))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        shape, self.param_dtype)
    contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), self.kernel_axes[self.in_dims:]), features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora is not None:
      y = y + self._lora(x, in_shape, features, contract)
    return y

  def _lora(self, x, in_shape, features, contract):
    lora, ins = self.lora, self.in_dims
    # PEFT's init: A kaiming-uniform (a = sqrt(5): bound 1/sqrt(fan_in)), B zeros.
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(ins)),
                                              out_axis=ins)
    a = self.param("lora_a", nn.with_logical_partitioning(a_init, (*self.kernel_axes[:ins], None)),
                   (*in_shape, lora.rank), self.param_dtype)
    b_axes = (None, *self.kernel_axes[ins:])
    b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros_init(), b_axes),
                   (lora.rank, *features), self.param_dtype)
    if lora.dropout > 0 and self.has_rng("dropout"):
      x = nn.Dropout(lora.dropout, deterministic=False)(x)
    h = jax.lax.dot_general(x.astype(self.dtype), a.astype(self.dtype), (contract, ((), ())))
    return jnp.tensordot(h, b.astype(self.dtype), axes=1) * jnp.asarray(lora.scale, self.dtype)


class Embed(nn.Module):
  """Lookup table [num_embeddings, features]; `attend` is the tied output projection."""
  num_embeddings: int
  features: int
  axes: Axes = ("vocab", "embed")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(0.02)

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """x: [..., features] -> [..., num_embeddings]."""
    return jnp.einsum("...e,ve->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


class RMSNorm(nn.Module):
  """LLaMA's RMSNorm: normalise in fp32, cast back, then scale (as the reference does)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm computed in fp32 (as the references keep their norms in fp32)."""
  eps: float = 1e-6
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                       features, self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                        features, self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), from erf: `jax.nn.gelu(approximate=False)` goes through erfc, which
  XLA:CPU evaluates at half the speed."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * 2 ** -0.5))


class Mlp(nn.Module):
  """Two-layer MLP, x: [..., embed] -> [..., embed] (ViT, BERT, ImageBind)."""
  hidden: int
  activation: Callable[[jax.Array], jax.Array] = gelu
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda features, axes, name: Dense(features, axes, use_bias=self.use_bias, dtype=self.dtype,
                                               param_dtype=self.param_dtype, name=name)
    h = self.activation(dense(self.hidden, ("embed", "mlp"), "fc1")(x))
    return dense(x.shape[-1], ("mlp", "embed"), "fc2")(h)
