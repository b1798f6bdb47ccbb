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
                   input_ids: jax.Array) -> jax.Array:
  """embeddings [B, T, E], mask [B, T], ids [B, T] -> [B, T - 1]: log p(ids[:, t + 1] | up to t)."""
  logits, _ = Llama(config).apply({"params": params}, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]


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
  logp = np.asarray(token_logprobs(system.config.llama, system.params["llm"], embeds, jnp.asarray(mask),
                                   jnp.asarray(ids)))
  # Row r holds its ids at [0, len); the answer's token at position p is scored by logp[r, p - 1].
  totals = np.array([logp[r, start - 1:len(s) - 1].sum() for r, (s, start) in enumerate(spans)])
  bounds = np.cumsum([0] + [len(t) for t in options])
  return [totals[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
