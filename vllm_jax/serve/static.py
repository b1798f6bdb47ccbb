"""Static batching, kept to measure the slot engine against (`vllm-jax serve --engine static`).

Up to `slots` waiting requests with the same sampling settings (and seed, when sampling) are
answered together in `slots` rows, after waiting up to `batch_wait_ms` for company; the batch runs
until its longest max_tokens (or every row's stop token), and the next batch waits for it. The
interface is the slot engine's (`engine.Worker`), without logprobs.
"""

import collections
import time

import jax.numpy as jnp
import numpy as np

from vllm_jax import generate
from vllm_jax.serve.engine import Request, Update, Worker, prompt_embeds


class StaticEngine(Worker):

  def __init__(self, config, params, stop_ids, *, slots: int = 8, max_len: int | None = None,
               batch_wait_ms: float = 20, max_waiting: int = 256):
    super().__init__(max_waiting)
    self.config, self.params, self.stop_ids, self.slots = config, params, list(stop_ids), slots
    self.max_len = max_len or config.max_position_embeddings
    self.batch_wait = batch_wait_ms / 1000
    self.running: list[Request] = []

  def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
    return prompt_tokens + max_tokens <= self.max_len

  def load(self) -> dict[str, int]:
    with self.cond:
      return {"waiting": len(self.waiting), "prefilling": 0, "busy_slots": len(self.running), "slots": self.slots}

  @staticmethod
  def _key(request: Request) -> tuple:
    return request.sampling, request.seed if request.sampling.temperature > 0 else None

  def _take(self) -> list[Request] | None:
    with self.cond:
      while not self.waiting and not self.stopping:
        self.cond.wait()
      if self.stopping:
        return None
      key = self._key(self.waiting[0])
      deadline = time.monotonic() + self.batch_wait
      while sum(self._key(r) == key for r in self.waiting) < self.slots and not self.stopping:
        if (left := deadline - time.monotonic()) <= 0:
          break
        self.cond.wait(left)
      batch = [r for r in self.waiting if self._key(r) == key][:self.slots]
      self.waiting = collections.deque(r for r in self.waiting if r not in batch)
      self.running = batch
      return batch

  def run(self) -> None:
    while (batch := self._take()) is not None:
      try:
        self._answer(batch)
      except Exception as e:  # a failed batch fails its requests, never the server
        for request in batch:
          request.notify(Update([], [], [], "error", error=e))
      with self.cond:
        self.running = []
    for request in self.waiting:
      request.notify(Update([], [], [], "cancelled"))

  def _answer(self, batch: list[Request]) -> None:
    embeds = [prompt_embeds(self.config, self.params, r) for r in batch]
    embeds += embeds[:1] * (self.slots - len(batch))
    length = -(-max(e.shape[1] for e in embeds) // 32) * 32
    inputs = np.stack([np.pad(e[0], ((length - e.shape[1], 0), (0, 0))) for e in embeds])
    mask = np.arange(length)[None] >= length - np.array([e.shape[1] for e in embeds])[:, None]
    finished = [False] * len(batch)

    def on_tokens(chunk):  # [slots, n] new ids
      for i, request in enumerate(batch):
        if finished[i]:
          continue
        new = [int(t) for t in chunk[i][:request.max_tokens - len(request.tokens)]]
        request.tokens += new
        update = Update(new, [], [])
        if any(t in self.stop_ids for t in new):
          update.finish_reason = "stop"
        elif len(request.tokens) >= request.max_tokens:
          update.finish_reason = "length"
        elif request.stop_check is not None and request.stop_check(request.tokens):
          update.finish_reason = "stop"
        elif request.cancelled:
          update.finish_reason = "cancelled"
        finished[i] = update.finish_reason is not None
        self.stats["generated_tokens"] += len(new)
        request.notify(update)

    first = batch[0]
    generate.generate(self.config, self.params, inputs_embeds=jnp.asarray(inputs), attention_mask=mask,
                      max_new_tokens=max(r.max_tokens for r in batch), sampling=first.sampling,
                      stop_token_ids=self.stop_ids, seed=first.seed, on_tokens=on_tokens)
