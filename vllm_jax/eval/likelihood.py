"""Ranking multiple-choice options by likelihood: the total log-probability of each option's tokens as
the assistant's answer after the prompt, with no generation. Every option of every question in a
batch is a row of one forward pass, the question's media tokens spliced into each of its rows."""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax.data.media import Media
from vllm_jax.data.tokenizer import right_pad
from vllm_jax.models.llama import Llama, LlamaConfig


@functools.partial(jax.jit, static_argnames=("config",))
def token_logprobs(config: LlamaConfig, params, inputs_embeds: jax.Array, attention_mask: jax.Array,
                   positions: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """embeddings [B, T, E], mask [B, T]; positions, targets [B, A] -> ([B, A] log p(targets[b, a] |
  the tokens up to positions[b, a]), [B, A] whether that target is the likeliest token). The vocabulary is projected at those positions only, not at
  all T (a video prompt's [B, T, V] logits would be most of the memory)."""
  model = Llama(config)
  hidden, _ = model.apply({"params": params}, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          method=Llama.hidden_states)
  hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
  logits = model.apply({"params": params}, hidden, method=Llama.logits)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], jnp.argmax(logp, axis=-1) == targets


def answer_ids(system, conversation, media: Media, text: str) -> tuple[list[int], int]:
  """The prompt followed by `text` as the answer -> (ids, where the answer's tokens start): the
  ids after the longest prefix shared with the prompt alone."""
  prompt = conversation.prompt()
  base, ids = system.prompt_ids(prompt, media), system.prompt_ids(prompt + " " + text, media)
  start = 0
  while start < min(len(base), len(ids)) and base[start] == ids[start]:
    start += 1
  return ids, start


def take_rows(tokens: Any, rows: Sequence[int]) -> Any:
  """What `encode_media` gave for a batch, one row per entry of `rows` (an index into the batch):
  a list holds one entry per item (LLaMA-VID's frame features), arrays have the batch first."""
  if isinstance(tokens, list):
    return [tokens[i] for i in rows]
  index = np.asarray(rows)
  return jax.tree.map(lambda x: x[index], tokens)


def option_logprobs(system, media: Sequence[Media], conversations: Sequence, options: Sequence[Sequence[str]], *,
                    use_audio: bool = False, rows: int | None = None) -> list[np.ndarray]:
  """The total log-probability of each option as the answer to each conversation (ending in its
  question): one array [len(options[i])] per item. `rows` pads the forward to that many rows
  (copies of the first), so that every batch of a run compiles once."""
  return [logprobs for logprobs, _ in option_scores(system, media, conversations, options, use_audio=use_audio,
                                                   rows=rows)]


def option_scores(system, media: Sequence[Media], conversations: Sequence, options: Sequence[Sequence[str]], *,
                  use_audio: bool = False, rows: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
  """As `option_logprobs`, with whether greedy decoding would give each option: per item
  (total log-probabilities [n], greedy [n] bool)."""
  spans, owner = [], []
  for i, (conversation, m, texts) in enumerate(zip(conversations, media, options)):
    for text in texts:
      spans.append(answer_ids(system, conversation, m, text))
      owner.append(i)
  fill = max(0, (rows or len(spans)) - len(spans))
  # Right-padded, as training batches are: the fused attention kernels take that layout.
  ids, mask = right_pad([s for s, _ in spans] + [spans[0][0]] * fill, multiple=32)
  owner += [0] * fill
  tokens = take_rows(system.encode_media(list(media), use_audio=use_audio), owner)
  embeds = system.embed(ids, tokens, [conversations[i] for i in owner])
  # Row r holds its ids at [0, len); the answer's token at position p is predicted at p - 1.
  shape = (ids.shape[0], max(len(s) - start for s, start in spans))  # the fill rows score nothing
  positions, targets, scored = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, bool)
  for r, (s, start) in enumerate(spans):
    n = len(s) - start
    positions[r, :n], targets[r, :n], scored[r, :n] = np.arange(start - 1, len(s) - 1), s[start:], True
  logp, likeliest = (np.asarray(x) for x in token_logprobs(system.config.llama, system.params["llm"], embeds,
                                                             jnp.asarray(mask), jnp.asarray(positions),
                                                             jnp.asarray(targets)))
  totals = np.where(scored, logp, 0.0).sum(axis=1)[:len(spans)]
  greedy = np.where(scored, likeliest, True).all(axis=1)[:len(spans)]
  bounds = np.cumsum([0] + [len(t) for t in options])
  return [(totals[a:b], greedy[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
