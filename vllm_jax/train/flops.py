"""Matmul FLOPs of a JAX function, counted from its jaxpr, and analytic counts for the cross-check.

`count(fn, *args)` traces `fn` (args may be ShapeDtypeStructs) and adds up the FLOPs of its
`dot_general`s and `conv_general_dilated`s: the MFU convention, where only matmuls count (elementwise
ops, reductions, softmax, norms, gathers and the optimizer update are left out). XLA's
`compiled.cost_analysis()` cannot serve here: it counts the body of a scan or while loop once, not
once per iteration, so a scanned layer stack comes out low by the number of layers.

  dot_general:          2 x (product of batch dims) x M x N x K = 2 x output elements x K
  conv_general_dilated: 2 x output elements x kernel elements per output feature
                        (window size x input features / feature_group_count)

Fused attention kernels count the matmuls they run over the whole T x S score matrix (masked blocks
too, as XLA's attention computes them): a Pallas kernel (splash) its body's matmuls once per step of
its grid, so its backward's recomputed scores count; cuDNN's opaque kernels as flash attention does
them, QKᵀ and PV forward (4·B·H·T·S·D), the backward recomputing QKᵀ then dV, dP, dQ and dK (10·…).

Sub-jaxprs are counted where they run: `scan` bodies `length` times, `shard_map` bodies once per
shard of the axes they make manual (the body sees per-shard shapes), pjit / closed_call / remat
(checkpoint) / custom_jvp / custom_vjp bodies once. `cond` counts its most expensive branch: an
upper bound, exact when the branches do the same matmuls (a data-dependent branch is unknown at
trace time). `while` counts its condition and body once each, as its trip count is unknown at trace
time: a lower bound, flagged by `Count.while_loops`; write loops with a static trip count as
`lax.scan` / `fori_loop` with static bounds (which lowers to scan) to count them exactly.
Under `jax.grad` the jaxpr holds the backward pass and any rematerialised forward, and those are
counted: the count is what runs, not 3 x the forward by convention.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.extend.core as jcore


@dataclasses.dataclass
class Count:
  """What `count_jaxpr` found."""
  flops: float = 0.0
  while_loops: int = 0  # while loops met, each counted for a single iteration
  by_dtype: dict[str, float] = dataclasses.field(default_factory=dict)  # FLOPs by the operands' dtype

  def add(self, other: "Count", times: int = 1) -> None:
    self.flops += times * other.flops
    self.while_loops += other.while_loops
    for dtype, flops in other.by_dtype.items():
      self.by_dtype[dtype] = self.by_dtype.get(dtype, 0.0) + times * flops

  def add_matmul(self, flops: float, dtype) -> None:
    self.add(Count(flops, 0, {str(dtype): flops}))


def count(fn: Callable[..., Any], *args, **kwargs) -> float:
  """The matmul FLOPs of one call `fn(*args, **kwargs)`, global (all devices together)."""
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs)).flops


def count_jaxpr(jaxpr: jcore.ClosedJaxpr | jcore.Jaxpr) -> Count:
  """The matmul FLOPs of a jaxpr, and how many while loops in it were counted once."""
  total = Count()
  for eqn in (jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr).eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      total.add_matmul(2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract), lhs.dtype)
    elif name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape  # its input-feature dim is already divided by the groups
      out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total.add_matmul(2 * math.prod(eqn.outvars[0].aval.shape) * (math.prod(kernel) // kernel[out_feature_dim]),
                       eqn.invars[0].aval.dtype)
    elif name in CUDNN_ATTENTION:
      total.add_matmul(cudnn_attention_flops(eqn), eqn.invars[0].aval.dtype)
    elif name == "cond":
      total.add(max((count_jaxpr(b) for b in eqn.params["branches"]), key=lambda c: c.flops))
    else:
      times = 1
      if name == "scan":
        times = eqn.params["length"]
      elif name == "shard_map":
        mesh = eqn.params["mesh"]
        times = math.prod(mesh.shape[a] for a in eqn.params["newly_manual_axes"])
      elif name == "pallas_call":  # a Pallas kernel's body runs once per step of its grid
        times = math.prod(eqn.params["grid_mapping"].grid)
      elif name == "while":
        total.while_loops += 1
      for sub in jcore.jaxprs_in_params(eqn.params):
        total.add(count_jaxpr(sub), times)
  return total



# jax's cuDNN attention primitives -> score-sized matmuls each runs (see the module docstring).
CUDNN_ATTENTION = {"dot_product_attention_fwd_wrapper": 2, "dot_product_attention_fwd": 2,
                   "dot_product_attention_bwd_wrapper": 5, "dot_product_attention_bwd": 5}


def cudnn_attention_flops(eqn) -> float:
  """2 x B x H x T x S x D per score-sized matmul: q [B, T, H, D] and k [B, S, K, D] (layout BTNH),
  or [B, H, T, D] / [B, K, S, D] (BNTH)."""
  q, k = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  (b, t, h, d), s = (q, k[1]) if eqn.params["layout"] == 0 else ((q[0], q[2], q[1], q[3]), k[2])
  return CUDNN_ATTENTION[eqn.primitive.name] * 2 * b * h * t * s * d


def llama_forward_flops(config, batch: int, seq_len: int) -> float:
  """Matmul FLOPs of `Llama(config)` on [batch, seq_len] tokens without a cache (the training
  forward): per layer the q, k, v, o projections, the attention scores and values over all
  seq_len keys (masked positions are computed too), the SwiGLU's gate, up and down and any LoRA
  adapters; then the lm_head (or the tied embedding's `attend`). The embedding lookup is a gather."""
  c = config
  e, m, qd, kvd = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  shapes = dict(q=(e, qd), k=(e, kvd), v=(e, kvd), o=(qd, e), gate=(e, m), up=(e, m), down=(m, e))
  per_token = sum(i * o for i, o in shapes.values())
  if c.lora is not None:
    per_token += sum(c.lora.rank * sum(shapes[t]) for t in c.lora.targets if t in shapes)
  tokens = batch * seq_len
  layer = 2 * tokens * per_token + 4 * batch * seq_len * seq_len * qd  # + QK^T and PV
  return c.num_layers * layer + 2 * tokens * e * c.vocab_size


def vit_forward_flops(config, images: int, height: int | None = None, width: int | None = None) -> float:
  """Matmul FLOPs of `ViT(config)` on [images, height, width, 3] (default: config.image_size):
  the patch embedding, and per block the q, k, v, out projections, the attention scores and values
  over its 1 + patches tokens, the MLP, and with `temporal_frames` T the temporal attention (the
  same projections over every token, attention over T frames). Leaves out the bicubic resize of the
  position table at other sizes (a matmul over the table, independent of the batch)."""
  c = config
  height, width = height or c.image_size, width or c.image_size
  patches = (height // c.patch_size) * (width // c.patch_size)
  tokens, d = images * (1 + patches), c.width
  attention = 2 * tokens * 4 * d * d + 4 * tokens * (1 + patches) * d
  block = attention + 2 * tokens * 2 * d * c.mlp_dim
  if c.temporal_frames:
    block += 2 * tokens * 4 * d * d + 4 * tokens * c.temporal_frames * d
  return 2 * images * patches * c.patch_size ** 2 * 3 * d + c.depth * block
