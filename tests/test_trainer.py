"""Train step and loop: sharded with gradient accumulation == single device, frozen parameters
untouched, non-finite steps skipped and counted, logging, TensorBoard, eval."""

import glob
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import train_tiny
from vllm_jax.train import optim, sharding, trainer


def test_cross_entropy_matches_torch():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 6, 11).astype(np.float32)
  labels = rng.randint(0, 11, (2, 6))
  labels[0, :3] = -100
  labels[1, 4] = -100
  loss_sum, count = trainer.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  ref = torch.nn.functional.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, 11),
                                          torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100)
  assert int(count) == 7
  np.testing.assert_allclose(float(loss_sum / count), float(ref), rtol=1e-6)


@pytest.mark.parametrize("chunk", [4, 5, 9])
def test_chunked_next_token_loss_matches_whole_sequence(chunk):
  """Slices of 4 (dividing the 12 positions), 5 (padded to 15) and 9: the loss, its count and the
  gradients of the hidden states and the vocabulary projection equal the unsliced loss's."""
  rng = np.random.RandomState(0)
  hidden = jnp.asarray(rng.randn(2, 12, 6), jnp.float32)
  kernel = jnp.asarray(rng.randn(6, 11), jnp.float32)
  labels = rng.randint(0, 11, (2, 12))
  labels[0, :3] = labels[1, 7] = -100
  labels = jnp.asarray(labels)

  def loss(hidden, kernel, chunk):
    return trainer.next_token_loss(hidden, labels, lambda x: x @ kernel, chunk)

  grads = jax.grad(lambda h, k, c: loss(h, k, c)[0], (0, 1))
  want, want_count = loss(hidden, kernel, 0)
  got, got_count = loss(hidden, kernel, chunk)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert float(got_count) == float(want_count) == 9 + 10
  for got, want in zip(grads(hidden, kernel, chunk), grads(hidden, kernel, 0)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_init_from_loaded_parameters_consumes_them():
  """`init(base)` on a (2, 2, 2) mesh: the state holds base's values (the frozen ones in bfloat16)
  and base's arrays are gone, as a loaded 7B model must not stay beside its copy in the state."""
  t = train_tiny.make_trainer(train_tiny.config(), sharding.make_mesh((2, 2, 2)))
  base = jax.jit(lambda k: nn.meta.unbox(t.params_fn(k)))(jax.random.key(1))
  want = optim.flatten(jax.device_get(base))
  state = t.init(base)
  assert all(x.is_deleted() for x in jax.tree.leaves(base))
  got = optim.flatten(jax.device_get(optim.merge(state.params, state.frozen)))
  assert set(got) == set(want)
  for path, value in got.items():
    np.testing.assert_array_equal(value, want[path].astype(value.dtype), err_msg=path)


def losses(result):
  return np.array([m["loss"] for m in result.history])


def test_sharded_matches_single_device_and_frozen_untouched():
  """Stage-1 shape (a few parameters train): 20 steps on a (2, 2, 2) mesh, accumulating 2 micro-batches
  per step, give the losses and parameters of one device taking the whole batch at once."""
  cfg = {"train.steps": 20, "train.log_every": 10}
  t8, r8 = train_tiny.run(train_tiny.config(**cfg, **{"optim.grad_accum": 2}), (2, 2, 2))
  t1, r1 = train_tiny.run(train_tiny.config(**cfg), (1, 1, 1), devices=jax.devices()[:1])
  np.testing.assert_allclose(losses(r8), losses(r1), rtol=1e-5)
  assert losses(r8)[-5:].mean() < losses(r8)[:5].mean()
  for k, v in optim.flatten(r8.state.params).items():
    np.testing.assert_allclose(np.asarray(v), np.asarray(optim.flatten(r1.state.params)[k]),
                               rtol=1e-4, atol=1e-6, err_msg=k)

  # Parameters really are split over the mesh: the tensor axis shards lm_head's vocab.
  assert r8.state.params["lm_head"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert sorted(optim.flatten(r8.state.params)) == ["lm_head/kernel", "norm/scale"]
  with jax.threefry_partitionable(False):
    initial = t8.init()
  for k, v in optim.flatten(r8.state.frozen).items():
    assert v.dtype == jnp.bfloat16, k
    np.testing.assert_array_equal(np.asarray(v), np.asarray(optim.flatten(initial.frozen)[k]), err_msg=k)
  for k, v in optim.flatten(r8.state.params).items():
    assert v.dtype == jnp.float32
    assert not np.array_equal(np.asarray(v), np.asarray(optim.flatten(initial.params)[k])), k
  assert t8.flops_per_step and t8.flops_per_step > 0


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, name="out")(nn.Dense(4, name="hidden")(x))


def linear_trainer(tmp_path, **overrides):
  cfg = train_tiny.config(**{"optim.trainable": ("^out/",), "optim.frozen_dtype": "float32",
                             "optim.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 2,
                             "train.workdir": str(tmp_path), "train.peak_tflops": 1e-3, **overrides})
  model = Linear()

  def loss_fn(params, batch, rng):
    del rng
    err = model.apply({"params": params}, batch["x"])[:, 0] - batch["y"]
    return jnp.sum(err * err), jnp.asarray(err.shape[0], jnp.float32)

  params_fn = lambda rng: model.init(rng, jnp.zeros((1, 3)))["params"]
  mesh = sharding.make_mesh()
  replicate = jax.tree.map(lambda _: sharding.replicated(mesh), jax.eval_shape(params_fn, jax.random.key(0)))
  return trainer.Trainer(cfg, mesh, loss_fn, params_fn, replicate)


def regression_batches(bad_steps=(), skipped=0):
  rng = np.random.RandomState(0)
  for step in range(1000):
    x = rng.randn(8, 3).astype(np.float32)
    y = x.sum(-1) * (np.nan if step in bad_steps else 1.0)
    yield dict(x=x, y=y.astype(np.float32), skipped=np.full(8, skipped, np.int32))


def test_nan_steps_skipped_counted_and_abort(tmp_path, caplog):
  t = linear_trainer(tmp_path, **{"train.max_nan_skips": 2})
  caplog.set_level(logging.INFO, logger="vllm_jax.train.trainer")
  state = t.init()
  before = jax.device_get(state.params)
  r = trainer.train_loop(t, state, regression_batches(bad_steps={0, 2}), steps=4,
                         eval_batches=lambda: [next(regression_batches())])
  finite = [m["finite"] for m in r.history]
  assert finite == [0.0, 1.0, 0.0, 1.0] and int(r.state.nan_skips) == 2
  assert np.isnan(r.history[0]["loss"])
  # The first update came from step 1 alone: step 0 changed nothing.
  assert not np.array_equal(jax.device_get(r.state.params)["out"]["kernel"], before["out"]["kernel"])
  assert int(r.state.opt_state[1].count) == 2  # Adam counted only the applied updates
  lines = [rec.getMessage() for rec in caplog.records]
  assert any(line.startswith("step 4 | loss ") and "tok/s" in line and "mfu " in line and "nan_skips 2" in line
             for line in lines), lines
  assert any(line.startswith("step 4 | eval_loss ") for line in lines), lines
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))

  with pytest.raises(FloatingPointError, match="non-finite"):
    trainer.train_loop(t, t.init(), regression_batches(bad_steps={0, 1, 2}), steps=5)


def test_skipped_examples_ceiling(tmp_path):
  t = linear_trainer(tmp_path, **{"data.max_skipped": 20, "train.workdir": ""})
  r = trainer.train_loop(t, t.init(), regression_batches(skipped=1), steps=2)
  assert r.skipped_examples == 16
  with pytest.raises(RuntimeError, match="unreadable"):
    trainer.train_loop(t, t.init(), regression_batches(skipped=1), steps=4)
