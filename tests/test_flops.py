"""The matmul FLOP counter: scans counted per iteration, exact against the analytic LLaMA and ViT counts,
close to XLA's cost_analysis where XLA counts right (no loops), the train step's backward and remat
derived exactly, and the logged MFU computed from the count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import train_tiny
from vllm_jax.models.llama import Llama, LlamaConfig
from vllm_jax.models.vit import ViT, ViTConfig
from vllm_jax.nn.lora import LoraConfig
from vllm_jax.train import flops, sharding, trainer

TINY_LLAMA = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=8, remat_policy="none")


def xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_scan_counts_every_iteration():
  x, ws = jax.ShapeDtypeStruct((4, 16), jnp.float32), jax.ShapeDtypeStruct((5, 16, 16), jnp.float32)

  def scanned(x, ws):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

  def unrolled(x, ws):
    for i in range(ws.shape[0]):
      x = jnp.tanh(x @ ws[i])
    return x

  assert flops.count(scanned, x, ws) == flops.count(unrolled, x, ws) == 5 * 2 * 4 * 16 * 16
  # XLA counts the scan body once (tanh: one flop an element).
  assert xla_flops(scanned, x, ws) == pytest.approx(2 * 4 * 16 * 16 + 4 * 16, rel=0.05)
  # Under grad with remat: the forward, its rerun in the backward, and the gradients of both operands.
  loss = lambda x, ws: jax.checkpoint(scanned)(x, ws).sum()
  assert flops.count(jax.grad(loss, argnums=(0, 1)), x, ws) == 4 * 5 * 2 * 4 * 16 * 16
  # cond: the dearer branch; while: its body once, flagged.
  cond = lambda x, ws: jax.lax.cond(x.sum() > 0, lambda: x @ ws[0] @ ws[1], lambda: x @ ws[0])
  assert flops.count(cond, x, ws) == 2 * 2 * 4 * 16 * 16
  loop = jax.make_jaxpr(lambda x, w: jax.lax.while_loop(lambda c: c[1] < c[0].sum(),
                                                        lambda c: (c[0] @ w, c[1] + 1), (x, 0.0))[0])
  result = flops.count_jaxpr(loop(x, jax.ShapeDtypeStruct((16, 16), jnp.float32)))
  assert (result.flops, result.while_loops) == (2 * 4 * 16 * 16, 1)


def test_custom_vjp_and_shard_map():
  x, w = jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 32), jnp.float32)
  matmul = 2 * 8 * 16 * 32

  @jax.custom_vjp
  def product(x, w):
    return x @ w
  product.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))
  assert flops.count(product, x, w) == matmul
  assert flops.count(jax.grad(lambda x, w: product(x, w).sum(), argnums=(0, 1)), x, w) == 3 * matmul

  # The body sees one shard of x: counted once per shard of the manual axis, the global total.
  mesh = jax.make_mesh((8,), ("x",))
  sharded = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x"))
  specs = (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P("x"))),
           jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=NamedSharding(mesh, P())))
  assert flops.count(sharded, *specs) == matmul


@pytest.mark.parametrize("config", [
    TINY_LLAMA,
    TINY_LLAMA.replace(tie_word_embeddings=True, lora=LoraConfig(rank=2, targets=("q", "v", "down")),
                       remat_policy="nothing_saveable"),
], ids=["plain", "tied_lora_remat"])
def test_llama_forward_matches_analytic(config):
  """Our Llama is always scanned: the count is num_layers x one layer's matmuls + the lm_head, exactly."""
  def forward_flops(cfg):
    model = Llama(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    return flops.count(lambda p, ids: model.apply({"params": p}, ids)[0], params, ids)

  counted = forward_flops(config)
  assert counted == flops.llama_forward_flops(config, 2, 16)
  per_layer = forward_flops(config.replace(num_layers=2)) - forward_flops(config.replace(num_layers=1))
  assert counted == forward_flops(config.replace(num_layers=1)) + (config.num_layers - 1) * per_layer


@pytest.mark.parametrize("temporal_frames", [0, 2])
def test_vit_forward_matches_analytic(temporal_frames):
  cfg = ViTConfig(image_size=28, patch_size=7, width=32, depth=3, num_heads=4, mlp_dim=64,
                  temporal_frames=temporal_frames)
  model = ViT(cfg)
  images = jax.ShapeDtypeStruct((4, 28, 28, 3), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((4, 28, 28, 3)))["params"])
  counted = flops.count(lambda p, x: model.apply({"params": p}, x), params, images)
  assert counted == flops.vit_forward_flops(cfg, 4)


def test_unscanned_matches_xla_cost_analysis():
  """Without loops XLA counts right; it also counts one flop per element of the elementwise ops and
  reductions (norms, softmax, RoPE, SiLU, residual adds: here 1.4% on top), which MFU leaves out."""
  cfg = TINY_LLAMA.replace(num_layers=1, hidden_size=128, intermediate_size=256, head_dim=32)
  model = Llama(cfg)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  forward = lambda p, ids: model.apply({"params": p}, ids)[0]
  counted = flops.count(forward, params, ids)
  assert counted < xla_flops(forward, params, ids) < 1.03 * counted

  # Convolutions, grouped too: 2 x output elements x kernel elements per output feature. (With
  # padding XLA leaves out the taps that fall on it; the count, like the hardware, does not.)
  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (2, 2), "VALID", feature_group_count=2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, k = jax.ShapeDtypeStruct((2, 17, 17, 8), jnp.float32), jax.ShapeDtypeStruct((3, 3, 4, 16), jnp.float32)
  assert flops.count(conv, x, k) == 2 * (2 * 8 * 8 * 16) * (3 * 3 * 4) == xla_flops(conv, x, k)


def step_flops(cfg):
  t = train_tiny.make_trainer(cfg, sharding.make_mesh((-1, 1, 1)))
  b, length = cfg.train.batch_size, cfg.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=t.batch_sharding)
           for k in ("input_ids", "attention_mask", "labels")}
  with sharding.mesh_context(t.mesh):
    counted = flops.count(t._step, t.abstract_state, batch)
  model = LlamaConfig(**cfg.model)
  forward = flops.llama_forward_flops(model, b, length)
  head = 2 * b * length * model.hidden_size * model.vocab_size
  return counted, forward, head, model


def test_train_step_counts_backward_and_remat():
  # Only norm and lm_head train: the backward is the lm_head's two matmuls (the kernel's gradient
  # and the gradient into the final norm); nothing below the norm is differentiated.
  counted, forward, head, _ = step_flops(train_tiny.config())
  assert counted == forward + 2 * head
  # Accumulating micro-batches (a scan over them) does the same matmuls.
  assert step_flops(train_tiny.config(**{"optim.grad_accum": 2}))[0] == counted
  # Everything trains: every matmul gets the gradients of both operands, 3 x the forward exactly
  # (the embedding trains, so even the first layer's input gradient is taken).
  full = train_tiny.config(**{"optim.trainable": (".*",)})
  counted, forward, head, model = step_flops(full)
  assert counted == 3 * forward
  # Remat (nothing_saveable) reruns each layer's forward in the backward except the `down`
  # projection, whose output only feeds the residual add, so the backward never needs it.
  counted_remat, *_ = step_flops(train_tiny.config(**{"optim.trainable": (".*",),
                                                      "model.remat_policy": "nothing_saveable"}))
  tokens = full.train.batch_size * full.data.seq_len
  layers = forward - head
  down = model.num_layers * 2 * tokens * model.intermediate_size * model.hidden_size
  assert counted_remat == 3 * forward + layers - down


def test_logged_mfu_uses_the_count(monkeypatch):
  cfg = train_tiny.config(**{"train.steps": 3, "train.log_every": 1, "train.peak_tflops": 1e-3})
  logged = []
  monkeypatch.setattr(trainer, "_log", lambda step, entry, writer: logged.append(entry))
  t, _ = train_tiny.run(cfg)
  counted, forward, head, _ = step_flops(cfg)
  assert t.flops_per_step == counted / 8 == (forward + 2 * head) / 8  # per device, 8 devices
  assert len(logged) == 3
  for entry in logged:
    np.testing.assert_allclose(entry["mfu"], t.flops_per_step / entry["step_time"] / 1e9, rtol=1e-12)


@pytest.mark.parametrize("impl,backward_units", [("splash", 3.5), ("cudnn", 2.5)])
def test_fused_attention_kernels_are_counted(monkeypatch, impl, backward_units):
  """A fused kernel counts its matmuls over the whole score matrix: the forward as XLA's attention;
  the backward as it runs (flash kernels recompute the scores: splash's dQ and dK/dV kernels 1.5 + 2
  score-sized units, cuDNN's 2.5) against XLA's 2. cuDNN is traced, not run: its version check is
  the only part that needs a GPU."""
  from jax._src.cudnn import fused_attention_stablehlo
  from vllm_jax.nn.attention import causal_attention
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fused_attention_stablehlo, "check_compute_capability", lambda capability: True)
  b, t, h, d = 2, 1024, 4, 64
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  valid = jnp.ones((b, t), bool)
  unit = 4 * b * h * t * t * d  # QKᵀ and PV

  def attend(impl):
    return lambda q, k, v: causal_attention(q, k, v, valid, jnp.arange(t), impl).astype(jnp.float32).sum()

  grad = lambda impl: jax.grad(attend(impl), argnums=(0, 1, 2))
  assert flops.count(attend("xla"), q, q, q) == flops.count(attend(impl), q, q, q) == unit
  assert flops.count(grad("xla"), q, q, q) == 3 * unit
  assert flops.count(grad(impl), q, q, q) == pytest.approx((1 + backward_units) * unit, rel=1e-3)
