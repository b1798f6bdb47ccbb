"""Continuous batching: a fixed number of decode slots over one KV cache, refilled as rows finish.

  submit -> waiting -> prefill (batch 1, `prefill_chunk` prompt tokens per engine step, reusing the
  longest cached prefix) -> insert into a free slot -> decode with every busy slot, `steps` tokens
  per device call -> a stop token, a stop string, max_tokens or a cancel frees the slot

One thread (`run`) owns the device state; any thread may `submit` and `cancel`. Each request's
`notify` gets `Update`s: its new tokens after every decode call, then one with `finish_reason`.

A row's sampling is its own: temperature, top-k, top-p and max_tokens per row, and the key of its
n-th token is fold_in(key(seed), n), so a sampled answer does not depend on what shares its batch.
Compiled shapes are bounded: prompt caches in power-of-two lengths, prefill pieces in powers of
two up to `prefill_chunk`, one decode shape per EXTENT slots of cache the busy rows fill.

Prefix reuse: prompt caches are kept (least recently used first out, `prefix_cache_mb`), and a new
prompt starts from the longest one whose ids and embeddings it begins with (the chat `Session`'s
rule: media tokens may differ between prompts with equal ids), prefilling only the rest.
"""

import collections
import dataclasses
import functools
import queue
import threading
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax.generate import SamplingConfig, embed_tokens
from vllm_jax.models.llama import KVCache, Llama, LlamaConfig

TOP_LOGPROBS = 20   # the most alternatives a token reports (OpenAI's limit)
MIN_PIECE = 32      # the shortest prefill piece (prompt tails are padded to a power of two from here)
EXTENT = 128        # decode attention reads the cache in multiples of this many slots


class Busy(Exception):
  """The waiting queue is full."""


@dataclasses.dataclass
class Update:
  """What a request got since the last update."""
  tokens: list[int]
  logprobs: list[float]                          # each token's log-probability under the model
  top_logprobs: list[list[tuple[int, float]]]    # the TOP_LOGPROBS likeliest tokens at each step
  finish_reason: str | None = None               # "stop", "length" or "cancelled" in the last update
  error: Exception | None = None                 # set when the request failed (finish_reason "error")
  reused: int = 0                                # prompt tokens found cached (first update only)


@dataclasses.dataclass(eq=False)
class Request:
  """One prompt to answer. `embeds` (run on the engine thread: media are encoded there) gives the
  prompt's embeddings [1, P, E]; without it the ids are embedded. `stop_check(tokens)` says
  whether the text so far ends the row (stop strings); `notify` receives every Update."""
  ids: Sequence[int]
  max_tokens: int
  sampling: SamplingConfig = SamplingConfig()
  seed: int = 0
  embeds: Callable[[], jax.Array] | None = None
  stop_check: Callable[[list[int]], bool] | None = None
  notify: Callable[[Update], None] = lambda update: None
  logprobs: bool = False  # report each token's alternatives (Update.top_logprobs)
  cancelled: bool = False
  tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far (the engine's)


@flax.struct.dataclass
class Slots:
  """The decode state of every slot; a free slot is inactive."""
  cache: KVCache          # [slots] rows, index per row
  last: jax.Array         # [B] int32, the token to feed next
  count: jax.Array        # [B] int32, tokens generated
  active: jax.Array       # [B] bool
  limit: jax.Array        # [B] int32, max_tokens
  keys: jax.Array         # [B] PRNG keys (the row's seed)
  temperature: jax.Array  # [B] float32, 0: greedy
  top_k: jax.Array        # [B] int32, 0: off
  top_p: jax.Array        # [B] float32, 1: off


@dataclasses.dataclass
class Prefill:
  """A request being prefilled into its own batch-1 cache."""
  request: Request
  embeds: np.ndarray      # [1, P, E]
  cache: KVCache          # batch 1, capacity a power of two
  slots: list[int]        # the cache slot of each prompt token cached so far
  done: int               # prompt tokens cached so far
  reused: int             # of which found in a kept prompt cache


@dataclasses.dataclass
class Prefix:
  """A finished prompt's cache, kept for reuse."""
  ids: list[int]
  embeds: np.ndarray
  cache: KVCache
  slots: list[int]

  @property
  def nbytes(self) -> int:
    return self.cache.k.nbytes * 2 + self.embeds.nbytes


def row_key(seed: int) -> jax.Array:
  """A PRNG key from any 64-bit seed (negative ones as their two's complement)."""
  seed &= 2**64 - 1
  return jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), seed >> 32)


def sample_rows(logits: jax.Array, keys: jax.Array, count: jax.Array, temperature: jax.Array,
                top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """logits [B, V] -> ids [B], each row with its own settings (as `generate.sample_logits`) and key
  (its row key folded with `count`, the index of the token drawn)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sampled():
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1)[:, None]
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
    kth = jnp.take_along_axis(ranked, jnp.clip(top_k - 1, 0, ranked.shape[-1] - 1)[:, None], axis=-1)
    kth = jnp.where(top_k[:, None] > 0, kth, -jnp.inf)
    ranked = jnp.where(ranked < kth, -jnp.inf, ranked)
    probs = jax.nn.softmax(ranked, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]  # the first token always stays
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where((scaled < kth) | (scaled < cutoff), -jnp.inf, scaled)
    draw = jax.vmap(lambda key, n, row: jax.random.categorical(jax.random.fold_in(key, n), row))
    return jnp.where(temperature > 0, draw(keys, count, scaled).astype(jnp.int32), greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def _choose(logits, keys, count, temperature, top_k, top_p):
  """-> (ids [B], their log-probabilities [B], top ids [B, K], top log-probabilities [B, K])."""
  logits = logits.astype(jnp.float32)
  ids = sample_rows(logits, keys, count, temperature, top_k, top_p)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  top, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
  return ids, jnp.take_along_axis(logprobs, ids[:, None], axis=-1)[:, 0], top_ids, top


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _extend(config: LlamaConfig, params, cache: KVCache, embeds: jax.Array, mask: jax.Array) -> KVCache:
  return Llama(config).apply({"params": params}, inputs_embeds=embeds, attention_mask=mask, cache=cache,
                             method=Llama.hidden_states)[1]


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _extend_and_choose(config: LlamaConfig, params, cache: KVCache, embeds, mask, key, temperature, top_k,
                       top_p):
  """The prompt's last piece, and its first token (drawn with count 0)."""
  model = Llama(config)
  hidden, cache = model.apply({"params": params}, inputs_embeds=embeds, attention_mask=mask, cache=cache,
                              method=Llama.hidden_states)
  logits = model.apply({"params": params}, hidden[:, -1], method=Llama.logits)
  return cache, _choose(logits, key[None], jnp.zeros(1, jnp.int32), temperature[None], top_k[None], top_p[None])


@functools.partial(jax.jit, static_argnames=("capacity",))
def _resized(cache: KVCache, capacity: int, keep: jax.Array) -> KVCache:
  """A batch-1 prompt cache with `capacity` slots holding the first `keep` of `cache`'s."""
  def fit(x, axis):
    size = x.shape[axis]
    if size >= capacity:
      return jax.lax.slice_in_dim(x, 0, capacity, axis=axis)
    return jnp.pad(x, [(0, capacity - size if a == axis else 0) for a in range(x.ndim)])
  valid = fit(cache.valid, 1) & (jnp.arange(capacity) < keep)
  return KVCache(k=fit(cache.k, 3), v=fit(cache.v, 3), valid=valid, index=keep.astype(jnp.int32))


@functools.partial(jax.jit, donate_argnames=("slots",))
def _insert(slots: Slots, row, prompt: KVCache, first, limit, key, temperature, top_k, top_p, stopped) -> Slots:
  """Put a prefilled prompt (batch 1) into slot `row`, its first token drawn."""
  cache = slots.cache
  put = lambda buffer, new: jax.lax.dynamic_update_slice(buffer, new, (0, row, 0, 0, 0))
  valid = jnp.zeros(cache.max_len, bool).at[:prompt.max_len].set(prompt.valid[0])
  cache = KVCache(k=put(cache.k, prompt.k), v=put(cache.v, prompt.v), valid=cache.valid.at[row].set(valid),
                  index=cache.index.at[row].set(prompt.index))
  return Slots(cache=cache, last=slots.last.at[row].set(first), count=slots.count.at[row].set(1),
               active=slots.active.at[row].set(~stopped & (limit > 1)), limit=slots.limit.at[row].set(limit),
               keys=slots.keys.at[row].set(key), temperature=slots.temperature.at[row].set(temperature),
               top_k=slots.top_k.at[row].set(top_k), top_p=slots.top_p.at[row].set(top_p))


@functools.partial(jax.jit, static_argnames=("config", "steps", "extent"), donate_argnames=("slots",))
def _decode(config: LlamaConfig, steps: int, extent: int, params, slots: Slots, stop_ids: jax.Array):
  """Up to `steps` tokens for every active row (fewer when all stop) -> (slots, tokens [B, steps]
  (-1 where a row made none), logprobs [B, steps], top ids and log-probabilities [B, steps, K]).
  Attention reads the first `extent` cache slots only (they hold every active row's tokens): a
  decode step then costs what the rows hold, not the longest row the cache could hold."""
  model = Llama(config)
  batch = slots.last.shape[0]
  full = slots.cache
  slots = slots.replace(cache=KVCache(k=full.k[:, :, :, :extent], v=full.v[:, :, :, :extent],
                                      valid=full.valid[:, :extent], index=full.index))
  out = (jnp.full((batch, steps), -1, jnp.int32), jnp.zeros((batch, steps)),
         jnp.zeros((batch, steps, TOP_LOGPROBS), jnp.int32), jnp.zeros((batch, steps, TOP_LOGPROBS)))

  def body(carry):
    step, s, out = carry
    logits, cache = model.apply({"params": params}, s.last[:, None], attention_mask=s.active[:, None],
                                cache=s.cache)
    ids, logprobs, top_ids, top = _choose(logits[:, -1], s.keys, s.count, s.temperature, s.top_k, s.top_p)
    ids = jnp.where(s.active, ids, -1)
    out = tuple(buffer.at[:, step].set(new) for buffer, new in zip(out, (ids, logprobs, top_ids, top)))
    count = s.count + s.active
    active = s.active & ~jnp.isin(ids, stop_ids) & (count < s.limit)
    return step + 1, s.replace(cache=cache, last=jnp.where(s.active, ids, s.last), count=count, active=active), out

  _, slots, out = jax.lax.while_loop(lambda c: (c[0] < steps) & jnp.any(c[1].active), body, (0, slots, out))
  near = slots.cache
  put = lambda buffer, new: jax.lax.dynamic_update_slice(buffer, new, (0,) * buffer.ndim)
  cache = KVCache(k=put(full.k, near.k), v=put(full.v, near.v), valid=put(full.valid, near.valid), index=near.index)
  return slots.replace(cache=cache), out


@functools.partial(jax.jit, donate_argnames=("slots",))
def _release(slots: Slots, row) -> Slots:
  return slots.replace(active=slots.active.at[row].set(False))


def prompt_embeds(config: LlamaConfig, params, request: Request) -> np.ndarray:
  """A request's prompt embeddings [1, P, E], on the host: cut into pieces there, as slicing on the
  device would compile per length. Ids are embedded at a padded length (one shape per bucket)."""
  if request.embeds is not None:
    return np.asarray(request.embeds())
  padded = np.zeros((1, _pow2(len(request.ids), MIN_PIECE)), np.int32)
  padded[0, :len(request.ids)] = request.ids
  return np.asarray(embed_tokens(config, params, jnp.asarray(padded)))[:, :len(request.ids)]


def _pow2(n: int, low: int = 1) -> int:
  return max(low, 1 << (n - 1).bit_length())


class Worker:
  """A thread answering requests from a bounded waiting queue: what the slot engine and static
  batching share. Subclasses give `fits`, `load` and `run` (the thread's loop)."""

  def __init__(self, max_waiting: int):
    self.max_waiting = max_waiting
    self.waiting: collections.deque[Request] = collections.deque()
    self.cond = threading.Condition()
    self.stopping = False
    self.stats = collections.Counter()  # generated_tokens, ...
    self.thread: threading.Thread | None = None

  def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
    raise NotImplementedError

  def load(self) -> dict[str, int]:
    """-> waiting, prefilling, busy_slots, slots."""
    raise NotImplementedError

  def run(self) -> None:
    raise NotImplementedError

  def submit(self, request: Request) -> Request:
    """Queue a request. Raises ValueError when it cannot fit, Busy when the queue is full."""
    if not self.fits(len(request.ids), request.max_tokens):
      raise ValueError(f"{len(request.ids)} prompt tokens and max_tokens {request.max_tokens} do not fit a row")
    with self.cond:
      if self.stopping:
        raise Busy("the engine is stopping")
      if len(self.waiting) >= self.max_waiting:
        raise Busy(f"{len(self.waiting)} requests are waiting")
      self.waiting.append(request)
      self.cond.notify_all()
    return request

  def cancel(self, request: Request) -> None:
    """Stop a request (a client that left): its row is freed at the next step."""
    with self.cond:
      request.cancelled = True
      self.cond.notify_all()

  def start(self):
    self.thread = threading.Thread(target=self.run, name=f"vllm-jax-{type(self).__name__}", daemon=True)
    self.thread.start()
    return self

  def stop(self) -> None:
    """Stop the loop; requests still waiting or running end with finish_reason "cancelled"."""
    with self.cond:
      self.stopping = True
      self.cond.notify_all()
    if self.thread is not None:
      self.thread.join()

  def generate(self, requests: Sequence[Request]) -> list[list[Update]]:
    """Submit `requests` to the running engine and wait -> each one's updates, in order."""
    updates = [queue.Queue() for _ in requests]
    for request, box in zip(requests, updates):
      request.notify = box.put
      self.submit(request)
    results = []
    for box in updates:
      got = [box.get()]
      while got[-1].finish_reason is None:
        got.append(box.get())
      results.append(got)
    return results


class Engine(Worker):
  """Continuous batching over `slots` rows of `max_len` cache slots each (a request's padded prompt
  and its max_tokens must fit one row). `prefill_chunk` is rounded up to a power of two."""

  def __init__(self, config: LlamaConfig, params, stop_ids: Sequence[int], *, slots: int = 8,
               max_len: int | None = None, steps: int = 8, prefill_chunk: int = 512, max_waiting: int = 256,
               prefix_cache_mb: float = 256):
    self.config, self.params, self.steps = config, params, steps
    self.prefill_chunk = _pow2(prefill_chunk, MIN_PIECE)
    # By default a row holds the whole context and the padding of a prompt's last piece (under half a chunk).
    self.max_len = max_len or config.max_position_embeddings + max(self.prefill_chunk // 2, MIN_PIECE)
    super().__init__(max_waiting)
    self.prefix_bytes = prefix_cache_mb * 2**20
    self.stop_ids = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    self.stop_id_set = set(stop_ids)
    self.slots = self._empty(slots)
    self.rows: list[Request | None] = [None] * slots
    self.lengths = [0] * slots  # cache slots each busy row fills (its index)
    self.prefill: Prefill | None = None  # the request being prefilled (one at a time)
    self.prefixes: collections.OrderedDict[int, Prefix] = collections.OrderedDict()

  def _empty(self, slots: int) -> Slots:
    return Slots(cache=KVCache.init(self.config, slots, self.max_len, per_row=True),
                 last=jnp.zeros(slots, jnp.int32), count=jnp.zeros(slots, jnp.int32), active=jnp.zeros(slots, bool),
                 limit=jnp.zeros(slots, jnp.int32), keys=jnp.stack([row_key(0)] * slots),
                 temperature=jnp.zeros(slots), top_k=jnp.zeros(slots, jnp.int32), top_p=jnp.ones(slots))

  # --- any thread -------------------------------------------------------------------------------

  def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
    """Whether a prompt of this length and max_tokens fit a row (the prompt's padding counted)."""
    return self._slots_for(prompt_tokens) + max_tokens <= self.max_len

  def _slots_for(self, tokens: int) -> int:
    """Cache slots that prefilling `tokens` prompt tokens takes: whole chunks, then a padded piece."""
    whole, rest = divmod(tokens, self.prefill_chunk)
    return whole * self.prefill_chunk + (_pow2(rest, MIN_PIECE) if rest else 0)

  def load(self) -> dict[str, int]:
    with self.cond:
      return {"waiting": len(self.waiting), "prefilling": int(self.prefill is not None),
              "busy_slots": sum(r is not None for r in self.rows), "slots": len(self.rows)}

  # --- the engine thread ------------------------------------------------------------------------

  def run(self) -> None:
    while True:
      with self.cond:
        while not self.stopping and not self.waiting and self.prefill is None and not any(self.rows):
          self.cond.wait()
        if self.stopping:
          break
      try:
        self.step()
      except Exception as e:  # a failed device call fails the requests it held, never the engine
        self._fail_running(e)
    for request in [*self.waiting, *([self.prefill.request] if self.prefill else []), *filter(None, self.rows)]:
      request.notify(Update([], [], [], "cancelled"))

  def step(self) -> None:
    """Drop cancelled requests, prefill up to `prefill_chunk` prompt tokens, decode `steps` tokens."""
    self._drop_cancelled()
    budget = self.prefill_chunk
    while budget > 0:
      if self.prefill is None:
        with self.cond:
          if None not in self.rows or not self.waiting:
            break
          request = self.waiting.popleft()
      else:
        request = self.prefill.request
      try:
        if self.prefill is None:
          self.prefill = self._start_prefill(request)
        else:
          budget -= self._prefill_piece(self.prefill)
      except Exception as e:  # this request fails (its media, say), the engine goes on
        self.prefill = None
        request.notify(Update([], [], [], "error", error=e))
    if any(self.rows):
      self._decode()

  def _fail_running(self, error: Exception) -> None:
    failed = [self.prefill.request] if self.prefill else []
    failed += [r for r in self.rows if r is not None]
    self.prefill, self.rows = None, [None] * len(self.rows)
    self.slots = self._empty(len(self.rows))  # a failed call may have consumed the donated state
    for request in failed:
      request.notify(Update([], [], [], "error", error=error))

  def _drop_cancelled(self) -> None:
    with self.cond:
      gone = [r for r in self.waiting if r.cancelled]
      self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
    if self.prefill is not None and self.prefill.request.cancelled:
      gone.append(self.prefill.request)
      self.prefill = None
    for row, request in enumerate(self.rows):
      if request is not None and request.cancelled:
        self._free(row)
        gone.append(request)
    for request in gone:
      request.notify(Update([], [], [], "cancelled"))

  def _start_prefill(self, request: Request) -> Prefill:
    ids = [int(i) for i in request.ids]
    embeds = prompt_embeds(self.config, self.params, request)
    prefix, common = self._longest_prefix(ids, embeds)
    start = prefix.slots[common - 1] + 1 if common else 0
    if start + self._slots_for(len(ids) - common) + request.max_tokens > self.max_len:
      common = start = 0  # the reused prompt's padding leaves no room: prefill it all
    capacity = min(_pow2(start + self._slots_for(len(ids) - common)), self.max_len)
    if common:
      self.prefixes.move_to_end(id(prefix))
      cache = _resized(prefix.cache, capacity, jnp.asarray(start))
      slots = prefix.slots[:common]
    else:
      cache, slots = KVCache.init(self.config, 1, capacity), []
    self.stats["prompt_tokens"] += len(ids)
    self.stats["reused_tokens"] += common
    request.ids = ids
    return Prefill(request, embeds, cache, slots, common, common)

  def _longest_prefix(self, ids: list[int], embeds: np.ndarray) -> tuple[Prefix | None, int]:
    """The kept prompt cache sharing the most leading tokens (ids and embeddings) with this prompt,
    at most all but its last token (which must be run to draw the first new one)."""
    best, best_common = None, 0
    for prefix in self.prefixes.values():
      common = 0
      for cached, new in zip(prefix.ids, ids[:-1]):
        if cached != new:
          break
        common += 1
      if common > best_common:
        equal = np.all(prefix.embeds[0, :common] == embeds[0, :common], axis=-1)
        common = common if equal.all() else int(np.argmin(equal))
      if common > best_common:
        best, best_common = prefix, common
    return best, best_common

  def _prefill_piece(self, job: Prefill) -> int:
    """Cache the next piece of a prompt (the last one also draws the first token and takes a slot).
    -> the piece's length."""
    request, total = job.request, len(job.request.ids)
    length = min(total - job.done, self.prefill_chunk)
    size = _pow2(length, MIN_PIECE)
    piece = np.zeros((1, size, job.embeds.shape[-1]), job.embeds.dtype)
    piece[:, size - length:] = job.embeds[:, job.done:job.done + length]  # left padding: the last token is last
    mask = np.arange(size)[None] >= size - length
    start = int(job.cache.index)
    job.slots += list(range(start + size - length, start + size))
    job.done += length
    if job.done < total:
      job.cache = _extend(self.config, self.params, job.cache, piece, mask)
      return size
    s = request.sampling
    key = row_key(request.seed)
    temperature = jnp.float32(s.temperature)
    cache, chosen = _extend_and_choose(self.config, self.params, job.cache, piece, mask, key, temperature,
                                       jnp.int32(s.top_k), jnp.float32(s.top_p))
    self.prefill = None
    self._keep_prefix(Prefix(request.ids, job.embeds, cache, job.slots))
    first, logprob, top_ids, top = (np.asarray(x)[0] for x in chosen)
    update = Update([int(first)], [float(logprob)], [list(zip(top_ids.tolist(), top.tolist()))], reused=job.reused)
    row = self.rows.index(None)
    self.slots = _insert(self.slots, row, cache, first, request.max_tokens, key, temperature, s.top_k, s.top_p,
                         jnp.isin(first, self.stop_ids))
    self.rows[row] = request
    self.lengths[row] = start + size  # the slots its prompt fills
    self._deliver(row, update)
    return size

  def _keep_prefix(self, prefix: Prefix) -> None:
    for key, kept in list(self.prefixes.items()):
      if kept.ids == prefix.ids:
        del self.prefixes[key]
    self.prefixes[id(prefix)] = prefix
    while self.prefixes and sum(p.nbytes for p in self.prefixes.values()) > self.prefix_bytes:
      self.prefixes.popitem(last=False)

  def _decode(self) -> None:
    longest = max(self.lengths[row] for row, request in enumerate(self.rows) if request is not None)
    extent = min(-(-(longest + self.steps) // EXTENT) * EXTENT, self.max_len)
    self.slots, out = _decode(self.config, self.steps, extent, self.params, self.slots, self.stop_ids)
    tokens, logprobs, top_ids, top = (np.asarray(x) for x in out)
    self.stats["decode_calls"] += 1
    for row, request in enumerate(self.rows):
      if request is not None:
        made = int((tokens[row] >= 0).sum())
        alternatives = ([list(zip(top_ids[row, i].tolist(), top[row, i].tolist())) for i in range(made)]
                        if request.logprobs else [])
        self.lengths[row] += made
        self._deliver(row, Update(tokens[row, :made].tolist(), logprobs[row, :made].tolist(), alternatives))

  def _deliver(self, row: int, update: Update) -> None:
    """Send a row's new tokens; free its slot when they end it."""
    request = self.rows[row]
    request.tokens += update.tokens
    self.stats["generated_tokens"] += len(update.tokens)
    if any(t in self.stop_id_set for t in update.tokens):
      update.finish_reason = "stop"
    elif len(request.tokens) >= request.max_tokens:
      update.finish_reason = "length"
    elif request.stop_check is not None and request.stop_check(request.tokens):
      update.finish_reason = "stop"
    if update.finish_reason is not None:
      self._free(row)
    request.notify(update)

  def _free(self, row: int) -> None:
    self.rows[row] = None
    self.slots = _release(self.slots, row)
