"""Batched generation: one jitted prefill, then a jitted `lax.while_loop` over decode steps.

Prompts are left-padded so every row writes the KV cache at the same slot. The decode loop
runs on device until every row has stopped or the token budget is spent; it returns to the
host only between chunks, when tokens are streamed to a callback or stop strings must be
checked against the decoded text.

Generation knows only the LLM: prompts arrive as token ids or as embeddings (a system's
`embed` splices media tokens into them, see `vllm_jax.systems`). `Session` keeps one
conversation's KV cache across turns, so each turn prefills only its new tokens.
"""

import dataclasses
import functools
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax.models.llama import KVCache, Llama, LlamaConfig


class ContextFullError(ValueError):
  """The cache cannot hold the prompt and the tokens to generate."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray          # [B, max_new_tokens], the pad id after a row stopped (see `generate`)
  lengths: np.ndarray         # [B] tokens generated per row (a stop token included)
  texts: list[str] | None     # decoded answers (cut before any stop string), with a tokenizer
  cache: KVCache | None = None  # the cache after the last decoded token was fed


@flax.struct.dataclass
class DecodeState:
  cache: KVCache
  tokens: jax.Array   # [B, room] int32, room >= max_new_tokens
  step: jax.Array     # [] int32, tokens written so far
  done: jax.Array     # [B] bool
  keys: jax.Array     # [B] PRNG keys, one per row (see `row_keys`)


def row_key(seed: int) -> jax.Array:
  """A PRNG key from any 64-bit seed (negative ones as their two's complement)."""
  seed &= 2**64 - 1
  return jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), seed >> 32)


def row_keys(seed: int | Sequence[int], batch: int) -> jax.Array:
  """One key per row [B]: from each row's own seed (a sequence), or row r's from `seed` folded with r.
  A row's n-th token is drawn with its key folded with n, so with its own seed a row's sample
  depends on that seed and its prompt alone, not on the rows beside it."""
  if np.ndim(seed) == 0:
    return jax.vmap(lambda r: jax.random.fold_in(row_key(int(seed)), r))(jnp.arange(batch))
  if len(seed) != batch:
    raise ValueError(f"{len(seed)} seeds for {batch} rows")
  return jnp.stack([row_key(int(s)) for s in seed])


def sample_logits(logits: jax.Array, keys: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """logits: [B, V] -> token ids [B] (greedy, or temperature / top-k / top-p sampling, row b
  drawn with keys[b])."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k > 0:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


PREFILL_CHUNK = 512  # prompt tokens run at once: attention holds [heads, chunk, cache] scores, not [L, L]


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def extend(config: LlamaConfig, params, cache: KVCache, inputs_embeds: jax.Array, attention_mask: jax.Array) -> KVCache:
  """Append a piece of the prompt to the cache (its logits are never computed)."""
  return Llama(config).apply({"params": params}, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             cache=cache, method=Llama.hidden_states)[1]


@functools.partial(jax.jit, static_argnames=("config", "sampling", "room"), donate_argnames=("cache",))
def prefill(config: LlamaConfig, sampling: SamplingConfig, room: int, params, cache: KVCache,
            inputs_embeds: jax.Array, attention_mask: jax.Array, stop_ids: jax.Array,
            keys: jax.Array, pad_id: jax.Array) -> DecodeState:
  """Run the prompt through the model and sample the first new token into a buffer of `room`
  tokens. Logits at the last position only: the LM head over the whole prompt ([T, vocab]) would
  be most of a short prompt's time."""
  model = Llama(config)
  hidden, cache = model.apply({"params": params}, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              cache=cache, method=Llama.hidden_states)
  step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.zeros(keys.shape, jnp.int32))
  first = sample_logits(model.apply({"params": params}, hidden[:, -1], method=Llama.logits), step_keys, sampling)
  batch = first.shape[0]
  tokens = jnp.full((batch, room), pad_id, jnp.int32).at[:, 0].set(first)
  return DecodeState(cache=cache, tokens=tokens, step=jnp.ones((), jnp.int32),
                     done=jnp.isin(first, stop_ids), keys=keys)


@functools.partial(jax.jit, static_argnames=("config", "sampling"), donate_argnames=("state",))
def decode(config: LlamaConfig, sampling: SamplingConfig, params, state: DecodeState, limit: jax.Array,
           stop_ids: jax.Array, pad_id: jax.Array) -> DecodeState:
  """Decode until `limit` tokens are written or every row is done."""
  model = Llama(config)

  def cond(s: DecodeState):
    return (s.step < limit) & ~jnp.all(s.done)

  def body(s: DecodeState):
    last = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1)
    logits, cache = model.apply({"params": params}, last, attention_mask=~s.done[:, None], cache=s.cache)
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(s.keys, s.step)
    token = jnp.where(s.done, pad_id, sample_logits(logits[:, -1], step_keys, sampling))
    tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, token, s.step, axis=1)
    return DecodeState(cache=cache, tokens=tokens, step=s.step + 1,
                       done=s.done | jnp.isin(token, stop_ids), keys=s.keys)

  return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames=("config",))
def embed_tokens(config: LlamaConfig, params, input_ids: jax.Array) -> jax.Array:
  return Llama(config).apply({"params": params}, input_ids, method=Llama.embed)


def generate(config: LlamaConfig, params, *, input_ids: jax.Array | np.ndarray | None = None,
             inputs_embeds: jax.Array | None = None, attention_mask=None, max_new_tokens: int = 32,
             sampling: SamplingConfig = SamplingConfig(), stop_token_ids: Sequence[int] = (),
             stop_strings: Sequence[str] = (), tokenizer=None, seed: int | Sequence[int] = 0,
             on_tokens: Callable[[np.ndarray], None] | None = None, chunk: int = 8,
             cache: KVCache | None = None) -> Generation:
  """Generate up to `max_new_tokens` for a batch of left-padded prompts.

  input_ids: [B, T] or inputs_embeds: [B, T, E] (e.g. text with spliced video tokens);
  attention_mask: [B, T], 0 on the left padding. A row stops at any of `stop_token_ids` or,
  with a `tokenizer`, when its text contains one of `stop_strings`. `on_tokens` receives each
  new chunk of tokens [B, n] as soon as it is decoded (`chunk` tokens at a time). A given
  `cache` is continued (the prompt is appended to it) and consumed; the result holds the new one.
  `seed`: one for the batch, or one per row (then a sampled row depends on its seed alone: `row_keys`).
  A long prompt (an hour of video: 7,200 tokens) runs PREFILL_CHUNK tokens at a time, so that
  its attention scores grow with its length, not with its square.
  """
  if inputs_embeds is None:
    inputs_embeds = embed_tokens(config, params, jnp.asarray(input_ids))
  batch, length = inputs_embeds.shape[:2]
  if attention_mask is None:
    attention_mask = np.ones((batch, length), np.int32)
  if stop_strings and tokenizer is None:
    raise ValueError("stop_strings need a tokenizer to decode the text")
  stop_ids = jnp.asarray(list(stop_token_ids) or [-1], jnp.int32)
  # After a row stops: the model's pad id, as transformers pads (else the first stop id, else 0).
  pad = config.pad_token_id if config.pad_token_id is not None else (stop_token_ids[0] if stop_token_ids else 0)
  pad_id = jnp.asarray(pad, jnp.int32)

  # Room for new tokens (the token buffer, a fresh cache's slots) in powers of two: requests that
  # differ only in max_new_tokens share the compiled steps.
  room = max(16, 1 << (max_new_tokens - 1).bit_length())
  if cache is None:
    cache = KVCache.init(config, batch, length + room)
  elif int(cache.index) + length + max_new_tokens > cache.max_len:
    raise ContextFullError(f"the cache holds {cache.max_len} tokens: {int(cache.index)} cached + {length} prompt + "
                     f"{max_new_tokens} new do not fit")
  attention_mask = jnp.asarray(attention_mask)
  last = length - 1 - (length - 1) % PREFILL_CHUNK  # the final piece (1..PREFILL_CHUNK tokens) samples
  for start in range(0, last, PREFILL_CHUNK):
    piece = slice(start, start + PREFILL_CHUNK)
    cache = extend(config, params, cache, inputs_embeds[:, piece], attention_mask[:, piece])
  state = prefill(config, sampling, room, params, cache, inputs_embeds[:, last:],
                  attention_mask[:, last:], stop_ids, row_keys(seed, batch), pad_id)
  interactive = on_tokens is not None or bool(stop_strings)
  step_size = chunk if interactive else max_new_tokens
  emitted, cut = 0, [None] * batch
  while True:
    limit = min(int(state.step) + step_size, max_new_tokens)
    state = decode(config, sampling, params, state, jnp.asarray(limit, jnp.int32), stop_ids, pad_id)
    step = int(state.step)
    if interactive:
      tokens = np.asarray(state.tokens[:, emitted:step])
      if on_tokens is not None and tokens.size:
        on_tokens(tokens)
      emitted = step
      if stop_strings:
        state = _stop_at_strings(state, tokenizer, stop_strings, cut, step)
    if step >= max_new_tokens or bool(jnp.all(state.done)):
      break
  return _finish(state, max_new_tokens, tokenizer, stop_token_ids, cut)


def _stop_at_strings(state: DecodeState, tokenizer, stop_strings, cut, step) -> DecodeState:
  """Mark rows whose text contains a stop string as done, remembering where to cut it."""
  tokens = np.asarray(state.tokens[:, :step])
  done = np.asarray(state.done).copy()
  for row in range(tokens.shape[0]):
    if cut[row] is None:
      text = tokenizer.decode(tokens[row], skip_special_tokens=True)
      hits = [text.find(s) for s in stop_strings if s in text]
      if hits:
        cut[row], done[row] = min(hits), True
  return state.replace(done=jnp.asarray(done))


def _finish(state: DecodeState, max_new_tokens: int, tokenizer, stop_token_ids, cut) -> Generation:
  tokens = np.asarray(state.tokens)[:, :max_new_tokens]
  step = int(state.step)
  lengths = np.full(tokens.shape[0], step, np.int32)
  for row in range(tokens.shape[0]):
    hits = np.flatnonzero(np.isin(tokens[row, :step], stop_token_ids))
    if hits.size:
      lengths[row] = hits[0] + 1
  texts = None
  if tokenizer is not None:
    texts = []
    for row in range(tokens.shape[0]):
      text = tokenizer.decode(tokens[row, :lengths[row]], skip_special_tokens=True)
      texts.append(text[:cut[row]] if cut[row] is not None else text)
  return Generation(tokens=tokens, lengths=lengths, texts=texts, cache=state.cache)


class Session:
  """One conversation (batch 1) whose KV cache is kept between turns.

  Each turn passes the ids of the whole conversation so far and their embeddings [1, L, E]
  (e.g. with spliced media tokens). The longest prefix already in the cache, same ids and same
  embeddings (media tokens may change with the question), is reused: the cache is rolled back
  to it and only the rest is prefilled (left-padded to a multiple of `bucket` so that few
  shapes compile). The answer is the one a fresh cache gives.
  """

  def __init__(self, config: LlamaConfig, params, max_len: int = 2048, bucket: int = 16):
    self.config, self.params, self.bucket = config, params, bucket
    self.cache = KVCache.init(config, 1, max_len)
    self.tokens: list[int] = []   # ids whose keys/values are in the cache, in order
    self.slots: list[int] = []    # the cache slot of each
    self.reused = 0               # prompt tokens the last turn found in the cache
    self.prompt_embeds = None     # [1, L, E] of the last turn's prompt (generated tokens are plain ids)

  def generate(self, input_ids: Sequence[int], inputs_embeds: jax.Array, **kwargs) -> Generation:
    """`generate` for the conversation `input_ids` [L] (embedded as inputs_embeds [1, L, E])."""
    ids = [int(i) for i in input_ids]
    common = 0
    for cached, new in zip(self.tokens, ids[:-1]):  # at least one token is prefilled
      if cached != new:
        break
      common += 1
    same = min(common, 0 if self.prompt_embeds is None else self.prompt_embeds.shape[1])
    if same:
      equal = np.asarray(jnp.all(inputs_embeds[0, :same] == self.prompt_embeds[0, :same], axis=-1))
      common = common if equal.all() else int(np.argmin(equal))
    index = self.slots[common - 1] + 1 if common else 0
    self.reused = common
    cache = self.cache.replace(index=jnp.asarray(index, jnp.int32),
                               valid=self.cache.valid.at[:, index:].set(False))
    tail = inputs_embeds[:, common:]
    length = -(-tail.shape[1] // self.bucket) * self.bucket
    pad = length - tail.shape[1]
    tail = jnp.pad(tail, ((0, 0), (pad, 0), (0, 0)))
    mask = np.arange(length)[None] >= pad
    out = generate(self.config, self.params, inputs_embeds=tail, attention_mask=mask, cache=cache, **kwargs)
    self.cache, out.cache = out.cache, None
    fed = int(self.cache.index) - index - length  # generated tokens fed back (all but the last)
    self.tokens = ids + [int(t) for t in out.tokens[0, :fed]]
    self.prompt_embeds = inputs_embeds
    self.slots = (self.slots[:common] + list(range(index + pad, index + length))
                  + list(range(index + length, index + length + fed)))
    return out
