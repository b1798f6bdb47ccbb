"""Continuous batching: a fixed number of decode slots over one KV cache, refilled as rows finish.

  submit -> waiting -> a free row (its cache starting from the longest kept prompt it begins with)
  -> prefill into the row, several rows' pieces per call, up to `prefill_chunk` prompt tokens per
  engine step -> decode with every row whose prompt is in, `steps` tokens per device call -> a stop
  token, a stop string, max_tokens or a cancel frees the row

One thread (`run`) owns the device state; any thread may `submit` and `cancel`. Each request's
`notify` gets `Update`s: its new tokens after every decode call, then one with `finish_reason`.

A row's sampling is its own: temperature, top-k, top-p and max_tokens per row, and the key of its
n-th token is fold_in(key(seed), n), so a sampled answer does not depend on what shares its batch.
Compiled shapes are bounded, and `precompile` compiles them all before serving: prefill calls of
power-of-two rows x power-of-two piece lengths (at most `prefill_chunk` tokens) over a power-of-two
number of cache slots, kept prompt caches in power-of-two lengths, one decode shape per EXTENT
slots of cache the decoding rows fill. A row's prompt token i sits in cache slot i: pieces are
right-padded, and padding takes no slots.

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

from vllm_jax.generate import SamplingConfig, embed_tokens, row_key
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
  """A request whose prompt is being cached into its row."""
  request: Request
  embeds: np.ndarray      # [1, P, E]
  done: int               # prompt tokens cached so far (token i sits in cache slot i)
  reused: int             # of which copied from a kept prompt cache


@dataclasses.dataclass
class Prefix:
  """A finished prompt's cache, kept for reuse."""
  ids: list[int]
  embeds: np.ndarray
  cache: KVCache          # batch 1, the prompt's token i in slot i

  @property
  def nbytes(self) -> int:
    return self.cache.k.nbytes * 2 + self.embeds.nbytes


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


@functools.partial(jax.jit, static_argnames=("capacity",))
def _prompt_cache(cache: KVCache, row, length, capacity: int) -> KVCache:
  """Row `row`'s first `length` slots as a batch-1 cache of `capacity` slots (a prompt kept for reuse)."""
  take = lambda x: jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_slice_in_dim(x, row, 1, axis=1), 0, capacity, axis=3)
  valid = jax.lax.dynamic_slice_in_dim(cache.valid, row, 1)[:, :capacity] & (jnp.arange(capacity) < length)
  return KVCache(k=take(cache.k), v=take(cache.v), valid=valid, index=jnp.asarray(length, jnp.int32))


@functools.partial(jax.jit, donate_argnames=("slots",))
def _start_row(slots: Slots, row, prompt: KVCache | None, length) -> Slots:
  """Empty row `row` for a new prompt, its first `length` tokens copied from a kept prompt cache."""
  cache = slots.cache
  valid = jnp.zeros(cache.max_len, bool)
  if prompt is not None:
    put = lambda buffer, new: jax.lax.dynamic_update_slice(buffer, new, (0, row, 0, 0, 0))
    cache = cache.replace(k=put(cache.k, prompt.k), v=put(cache.v, prompt.v))
    valid = valid.at[:prompt.max_len].set(prompt.valid[0]) & (jnp.arange(cache.max_len) < length)
  cache = cache.replace(valid=cache.valid.at[row].set(valid), index=cache.index.at[row].set(length))
  return slots.replace(cache=cache, active=slots.active.at[row].set(False))


@functools.partial(jax.jit, static_argnames=("config", "extent"), donate_argnames=("slots",))
def _prefill(config: LlamaConfig, extent: int, params, slots: Slots, rows, embeds, lengths, last, limit, keys,
             temperature, top_k, top_p, stop_ids):
  """Cache the next piece of several rows' prompts at once: embeds [n, T, E] (right padded, `lengths`
  [n] tokens each) go into `rows` [n] (len(slots) for a padding row: read as empty, never written).
  Each row draws a token (count 0) after its piece; rows whose piece ends their prompt (`last` [n])
  start decoding from it with their settings (`limit` ... `top_p`, [n] each) -> (slots, (ids,
  logprobs, top ids, top log-probabilities) [n] of those tokens). Only the first `extent` cache
  slots are read and written: they hold every row's prompt so far and this piece."""
  model, cache = Llama(config), slots.cache
  get = lambda x, axis, fill=0: jnp.take(x, rows, axis=axis, mode="fill", fill_value=fill)
  piece = KVCache(k=get(cache.k[:, :, :, :extent], 1), v=get(cache.v[:, :, :, :extent], 1),
                  valid=get(cache.valid[:, :extent], 0, False), index=get(cache.index, 0))
  mask = jnp.arange(embeds.shape[1]) < lengths[:, None]
  hidden, piece = model.apply({"params": params}, inputs_embeds=embeds, attention_mask=mask, cache=piece,
                              method=Llama.hidden_states)
  final = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
  logits = model.apply({"params": params}, final, method=Llama.logits)
  chosen = _choose(logits, keys, jnp.zeros_like(lengths), temperature, top_k, top_p)
  first = chosen[0]

  # A row's decode settings matter once it is active: those of rows still prefilling are overwritten later.
  put = lambda x, new, axis=0: x.at[(slice(None),) * axis + (rows,)].set(new, mode="drop")
  near = lambda x, new: x.at[:, rows, :, :extent].set(new, mode="drop")
  cache = KVCache(k=near(cache.k, piece.k), v=near(cache.v, piece.v),
                  valid=cache.valid.at[rows, :extent].set(piece.valid, mode="drop"),
                  index=put(cache.index, piece.index - embeds.shape[1] + lengths))  # right padding takes no slots
  active = last & ~jnp.isin(first, stop_ids) & (limit > 1)
  return slots.replace(cache=cache, last=put(slots.last, first), count=put(slots.count, jnp.ones_like(first)),
                       active=put(slots.active, active), limit=put(slots.limit, limit), keys=put(slots.keys, keys),
                       temperature=put(slots.temperature, temperature), top_k=put(slots.top_k, top_k),
                       top_p=put(slots.top_p, top_p)), chosen


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
    cache = cache.replace(index=jnp.where(s.active, cache.index, s.cache.index))  # a row being prefilled stays put
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
  """Continuous batching over `slots` rows of `max_len` cache slots each (a request's prompt and its
  max_tokens must fit one row). `prefill_chunk` is rounded up to a power of two."""

  def __init__(self, config: LlamaConfig, params, stop_ids: Sequence[int], *, slots: int = 8,
               max_len: int | None = None, steps: int = 8, prefill_chunk: int = 512, max_waiting: int = 256,
               prefix_cache_mb: float = 256):
    self.config, self.params, self.steps = config, params, steps
    self.prefill_chunk = _pow2(prefill_chunk, MIN_PIECE)
    self.max_len = max_len or config.max_position_embeddings
    super().__init__(max_waiting)
    self.prefix_bytes = prefix_cache_mb * 2**20
    self.stop_ids = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    self.stop_id_set = set(stop_ids)
    self.slots = self._empty(slots)
    self.rows: list[Request | None] = [None] * slots
    self.lengths = [0] * slots  # cache slots each decoding row fills (its index)
    self.prefilling: dict[int, Prefill] = {}  # rows whose prompt is being cached, first come first
    self.prefixes: collections.OrderedDict[int, Prefix] = collections.OrderedDict()

  def _empty(self, slots: int) -> Slots:
    return Slots(cache=KVCache.init(self.config, slots, self.max_len, per_row=True),
                 last=jnp.zeros(slots, jnp.int32), count=jnp.zeros(slots, jnp.int32), active=jnp.zeros(slots, bool),
                 limit=jnp.zeros(slots, jnp.int32), keys=jnp.stack([row_key(0)] * slots),
                 temperature=jnp.zeros(slots), top_k=jnp.zeros(slots, jnp.int32), top_p=jnp.ones(slots))

  # --- any thread -------------------------------------------------------------------------------

  def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
    return prompt_tokens + max_tokens <= self.max_len

  def load(self) -> dict[str, int]:
    with self.cond:
      return {"waiting": len(self.waiting), "prefilling": len(self.prefilling),
              "busy_slots": sum(r is not None for r in self.rows), "slots": len(self.rows)}

  # --- the engine thread ------------------------------------------------------------------------

  def run(self) -> None:
    while True:
      with self.cond:
        while not self.stopping and not self.waiting and not any(self.rows):
          self.cond.wait()
        if self.stopping:
          break
      try:
        self.step()
      except Exception as e:  # a failed device call fails the requests it held, never the engine
        self._fail_running(e)
    for request in [*self.waiting, *filter(None, self.rows)]:
      request.notify(Update([], [], [], "cancelled"))

  def step(self) -> None:
    """Drop cancelled requests, give free rows to waiting ones, cache up to `prefill_chunk` prompt
    tokens, decode `steps` tokens."""
    self._drop_cancelled()
    while None in self.rows:
      with self.cond:
        if not self.waiting:
          break
        request = self.waiting.popleft()
      try:
        self._admit(self.rows.index(None), request)
      except Exception as e:  # this request fails (its media, say), the engine goes on
        request.notify(Update([], [], [], "error", error=e))
    if self.prefilling:
      self._prefill()
    if any(r is not None and row not in self.prefilling for row, r in enumerate(self.rows)):
      self._decode()

  def _fail_running(self, error: Exception) -> None:
    failed = [r for r in self.rows if r is not None]
    self.rows, self.prefilling = [None] * len(self.rows), {}
    self.slots = self._empty(len(self.rows))  # a failed call may have consumed the donated state
    for request in failed:
      request.notify(Update([], [], [], "error", error=error))

  def _drop_cancelled(self) -> None:
    with self.cond:
      gone = [r for r in self.waiting if r.cancelled]
      self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
    for row, request in enumerate(self.rows):
      if request is not None and request.cancelled:
        self._free(row)
        gone.append(request)
    for request in gone:
      request.notify(Update([], [], [], "cancelled"))

  def _admit(self, row: int, request: Request) -> None:
    """Give `row` to a request: its cache starts from the longest kept prompt it begins with."""
    ids = [int(i) for i in request.ids]
    embeds = prompt_embeds(self.config, self.params, request)
    prefix, common = self._longest_prefix(ids, embeds)
    if common:
      self.prefixes.move_to_end(id(prefix))
    self.slots = _start_row(self.slots, row, prefix.cache if common else None, jnp.int32(common))
    self.stats["prompt_tokens"] += len(ids)
    self.stats["reused_tokens"] += common
    request.ids = ids
    self.rows[row] = request
    self.prefilling[row] = Prefill(request, embeds, common, common)

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

  def _prefill(self) -> None:
    """Cache the next piece of the prompts being prefilled: as many rows as fit `prefill_chunk`
    tokens, first come first, in one call (rows and piece length both powers of two). A prompt that
    ends draws its first token and starts decoding; it is kept for reuse."""
    group, size = [], MIN_PIECE
    for row, job in self.prefilling.items():
      grown = max(size, _pow2(min(len(job.request.ids) - job.done, self.prefill_chunk), MIN_PIECE))
      if group and _pow2(len(group) + 1) * grown > self.prefill_chunk:
        break
      group.append(row)
      size = grown
    jobs = [self.prefilling[row] for row in group]
    lengths = [min(len(job.request.ids) - job.done, size) for job in jobs]
    embeds = np.zeros((_pow2(len(group)), size, self.config.hidden_size), jnp.dtype(self.config.dtype))
    for i, (job, length) in enumerate(zip(jobs, lengths)):
      embeds[i, :length] = job.embeds[0, job.done:job.done + length]
    last = [job.done + length == len(job.request.ids) for job, length in zip(jobs, lengths)]
    extent = self._prefill_extent(max(job.done for job in jobs) + size)
    first, logprob, top_ids, top = self._prefill_call(extent, group, embeds, lengths, last, [j.request for j in jobs])
    for i, (row, job) in enumerate(zip(group, jobs)):
      job.done += lengths[i]
      if not last[i]:
        continue
      del self.prefilling[row]
      self.lengths[row] = job.done
      if self.prefix_bytes > 0:
        cache = _prompt_cache(self.slots.cache, row, job.done, self._capacity(job.done))
        self._keep_prefix(Prefix(job.request.ids, job.embeds, cache))
      self._deliver(row, Update([int(first[i])], [float(logprob[i])], [list(zip(top_ids[i].tolist(), top[i].tolist()))],
                                reused=job.reused))

  def _prefill_call(self, extent: int, rows: list[int], embeds: np.ndarray, lengths: list[int], last: list[bool],
                    requests: list[Request]) -> list[np.ndarray]:
    """One `_prefill` call for `requests` in `rows`, padded with empty rows to embeds' batch -> the
    tokens drawn: ids, logprobs, top ids, top logprobs, on the host."""
    pad = len(embeds) - len(rows)
    sampling = [r.sampling for r in requests] + [SamplingConfig()] * pad
    self.slots, chosen = _prefill(
        self.config, extent, self.params, self.slots, np.array(rows + [len(self.rows)] * pad, np.int32), embeds,
        np.array(lengths + [0] * pad, np.int32), np.array(last + [False] * pad),
        np.array([r.max_tokens for r in requests] + [0] * pad, np.int32),
        jnp.stack([row_key(r.seed) for r in requests] + [row_key(0)] * pad),
        np.array([s.temperature for s in sampling], np.float32), np.array([s.top_k for s in sampling], np.int32),
        np.array([s.top_p for s in sampling], np.float32), self.stop_ids)
    self.stats["prefill_calls"] += 1
    return [np.asarray(x) for x in chosen]

  def _capacity(self, tokens: int) -> int:
    """The slots of a kept prompt cache: a power of two, so few shapes."""
    return min(_pow2(tokens), self.max_len)

  def _prefill_extent(self, end: int) -> int:
    """The cache slots a prefill call reads and writes when its pieces end by slot `end`."""
    return min(max(_pow2(end), EXTENT), self.max_len)

  def _decode_extent(self, longest: int) -> int:
    """The cache slots a decode call reads when its longest row fills `longest`: room for `steps`
    more, in multiples of EXTENT."""
    return min(-(-(longest + self.steps) // EXTENT) * EXTENT, self.max_len)

  def precompile(self) -> int:
    """Compile every shape the engine can meet (call before `start`), so that no request waits for
    a compile -> how many shapes: decode extents, prefill (rows, piece, extent), prompt caches."""
    assert self.thread is None, "precompile before start"
    shapes = 0
    for extent in sorted({self._decode_extent(n) for n in range(self.max_len)}):  # every row inactive: no step
      self.slots, _ = _decode(self.config, self.steps, extent, self.params, self.slots, self.stop_ids)
      shapes += 1
    dtype = jnp.dtype(self.config.dtype)
    for batch in sorted({_pow2(n) for n in range(1, len(self.rows) + 1)}):
      for size in (1 << k for k in range(MIN_PIECE.bit_length() - 1, self.prefill_chunk.bit_length())):
        if batch > 1 and batch * size > self.prefill_chunk:
          continue
        for extent in sorted({self._prefill_extent(end) for end in range(size, self.max_len + size)}):
          self._prefill_call(extent, [], np.zeros((batch, size, self.config.hidden_size), dtype), [], [], [])
          shapes += 1
    for capacity in sorted({self._capacity(n) for n in range(1, self.max_len + 1)}):
      self.slots = _start_row(self.slots, 0, _prompt_cache(self.slots.cache, 0, 0, capacity), jnp.int32(0))
      shapes += 2
    self.slots = _release(_start_row(self.slots, 0, None, jnp.int32(0)), 0)
    return shapes + 2

  def _keep_prefix(self, prefix: Prefix) -> None:
    for key, kept in list(self.prefixes.items()):
      if kept.ids == prefix.ids:
        del self.prefixes[key]
    self.prefixes[id(prefix)] = prefix
    while self.prefixes and sum(p.nbytes for p in self.prefixes.values()) > self.prefix_bytes:
      self.prefixes.popitem(last=False)

  def _decode(self) -> None:
    extent = self._decode_extent(max(self.lengths[row] for row, request in enumerate(self.rows)
                                     if request is not None and row not in self.prefilling))
    self.slots, out = _decode(self.config, self.steps, extent, self.params, self.slots, self.stop_ids)
    tokens, logprobs, top_ids, top = (np.asarray(x) for x in out)
    self.stats["decode_calls"] += 1
    for row, request in enumerate(self.rows):
      if request is not None and row not in self.prefilling:
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
    self.prefilling.pop(row, None)
    self.slots = _release(self.slots, row)
