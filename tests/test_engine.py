"""The serving engine: answers equal batch-1 `generate`'s whatever shares the slots (queued,
refilled, chunked prefill), sampled answers depend on their seed alone, prefix reuse changes no
answer, a cancel frees its slot, and logprobs are the model's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllm_jax import generate as gen
from vllm_jax.models.llama import Llama, LlamaConfig
from vllm_jax.serve import engine as engine_lib
from vllm_jax.serve.engine import Engine, Request, sample_rows
from vllm_jax.serve.static import StaticEngine

CONFIG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=256)
STOP = 2


@pytest.fixture(scope="module")
def params():
  params = nn.meta.unbox(Llama(CONFIG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  return jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)  # sharper logits: fewer near-ties


@pytest.fixture(scope="module")
def engine(params):
  engine = Engine(CONFIG, params, [STOP], slots=3, steps=4, prefill_chunk=32).start()
  yield engine
  engine.stop()


def prompts(seed=0, lengths=(5, 70, 12, 40, 33, 9)):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in lengths]


def alone(params, ids, max_tokens):
  out = gen.generate(CONFIG, params, input_ids=np.array([ids]), max_new_tokens=max_tokens, stop_token_ids=[STOP])
  return out.tokens[0, :out.lengths[0]].tolist()


def tokens(updates):
  return sum((u.tokens for u in updates), [])


def test_answers_equal_batch_one_generation_while_slots_are_refilled(params, engine):
  """Six requests, three slots: the later ones wait, then take the slots rows free; prompts over
  32 tokens are prefilled in pieces between decode calls."""
  limits = [3, 40, 17, 8, 25, 30]
  results = engine.generate([Request(ids, n) for ids, n in zip(prompts(), limits)])
  for ids, n, updates in zip(prompts(), limits, results):
    assert tokens(updates) == alone(params, ids, n)
    assert updates[-1].finish_reason == ("stop" if tokens(updates)[-1] == STOP else "length")
    assert all(u.finish_reason is None for u in updates[:-1])


def test_a_sampled_answer_depends_on_its_seed_alone(params, engine):
  sampling = gen.SamplingConfig(1.0, 20, 0.9)
  ids = prompts()[1]
  first = tokens(engine.generate([Request(ids, 20, sampling, seed=7)])[0])
  crowd = engine.generate([Request(prompts()[0], 20, sampling, seed=1), Request(ids, 20, sampling, seed=7),
                           Request(prompts()[2], 5)])
  assert tokens(crowd[1]) == first
  assert tokens(engine.generate([Request(ids, 20, sampling, seed=8)])[0]) != first
  # generate draws a row with its own seed as the engine does: the same answer, beside another row.
  other = prompts()[0]
  rows = np.zeros((2, len(ids)), np.int32)
  rows[0, -len(other):], rows[1] = other, ids
  out = gen.generate(CONFIG, params, input_ids=rows, attention_mask=rows > 0, max_new_tokens=20,
                     sampling=sampling, stop_token_ids=[STOP], seed=[1, 7])
  assert out.tokens[1, :out.lengths[1]].tolist() == first


def test_a_shared_prefix_is_reused_and_changes_no_answer(params, engine):
  ids = prompts(seed=3, lengths=(60,))[0]
  engine.generate([Request(ids, 4)])
  longer = ids + [5, 6, 7]
  updates = engine.generate([Request(longer, 10)])[0]
  assert updates[0].reused == len(ids) and tokens(updates) == alone(params, longer, 10)


def test_a_cancelled_request_frees_its_slot(engine):
  long = Request(prompts()[0], 200)
  long.notify = lambda update: engine.cancel(long) if not long.cancelled else None  # leave at the first tokens
  engine.submit(long)
  short = engine.generate([Request(prompts()[2], 5)])[0]
  assert short[-1].finish_reason in ("stop", "length")
  assert long.cancelled and len(long.tokens) < 200 and engine.load()["busy_slots"] == 0


def test_logprobs_are_the_models(params, engine):
  ids = prompts()[3]
  request = Request(ids, 3, logprobs=True)
  updates = engine.generate([request])[0]
  logits, _ = Llama(CONFIG).apply({"params": params}, jnp.asarray([ids]))
  expected = jax.nn.log_softmax(logits[0, -1])
  first = updates[0]
  assert first.top_logprobs[0][0][0] == first.tokens[0] == int(jnp.argmax(expected))
  np.testing.assert_allclose(first.logprobs[0], expected[first.tokens[0]], atol=1e-4)
  np.testing.assert_allclose([lp for _, lp in first.top_logprobs[0]], jnp.sort(expected)[::-1][:20], atol=1e-4)


def test_a_precompiled_engine_compiles_nothing_while_serving(params):
  """Queued, refilled, several prompts prefilled in one call, pieces, reused prefixes: every shape
  was compiled before the engine started (each jitted function's cache stays as it was)."""
  engine = Engine(CONFIG, params, [STOP], slots=3, steps=4, prefill_chunk=64)
  assert engine.precompile() > 0
  functions = [engine_lib._decode, engine_lib._prefill, engine_lib._start_row, engine_lib._prompt_cache,
               engine_lib._release]
  compiled = [f._cache_size() for f in functions]
  engine.start()
  try:
    ids = prompts(seed=5, lengths=(5, 150, 12, 40, 33, 9, 70))
    engine.generate([Request(p, n) for p, n in zip(ids, [3, 40, 17, 100, 25, 30, 8])])
    engine.generate([Request(ids[1] + [4, 5], 20), Request(ids[3][:30], 20)])  # reused prefixes
  finally:
    engine.stop()
  assert [f._cache_size() for f in functions] == compiled


def test_per_row_sampling_filters():
  """Rows of one call, each with its own temperature, top-k and top-p (as `generate.sample_logits`)."""
  rows = 2000
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * rows))
  keys = jax.random.split(jax.random.key(0), rows)
  count = jnp.zeros(rows, jnp.int32)

  def draw(temperature, top_k, top_p):
    setting = lambda value, dtype: jnp.full(rows, value, dtype)
    return set(np.asarray(sample_rows(logits, keys, count, setting(temperature, jnp.float32),
                                      setting(top_k, jnp.int32), setting(top_p, jnp.float32))).tolist())

  assert draw(0, 0, 1) == {0}
  assert draw(1, 2, 1) == {0, 1} and draw(1, 0, 0.9) == {0, 1, 2} and draw(1, 0, 0.4) == {0}
  assert draw(1, 0, 1) == {0, 1, 2, 3}
  mixed = np.asarray(sample_rows(logits[:2], keys[:2], count[:2], jnp.array([0.0, 1.0]), jnp.array([0, 1]),
                                 jnp.array([1.0, 1.0])))
  assert mixed.tolist() == [0, 0]  # greedy, and sampling among the best one


def test_the_static_engine_answers_as_batch_one_generation(params):
  """The earlier batching, kept for comparison, answers the same (its batch runs to the longest)."""
  engine = StaticEngine(CONFIG, params, [STOP], slots=3, batch_wait_ms=50).start()
  try:
    limits = [3, 20, 9]
    results = engine.generate([Request(ids, n) for ids, n in zip(prompts()[:3], limits)])
  finally:
    engine.stop()
  for ids, n, updates in zip(prompts()[:3], limits, results):
    assert tokens(updates) == alone(params, ids, n)
