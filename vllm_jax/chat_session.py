"""A multi-turn conversation about one video or image, as `vllm-jax chat` and `vllm-jax web` hold
it: the media encoded once, the KV cache kept between turns, the oldest turns dropped when the
conversation outgrows the cache, the answer streamed as text."""

import copy

from vllm_jax import generate
from vllm_jax.data.conversation import visible_prefix

BUCKET = 16  # prompt tails are padded to a multiple of this, so that few shapes compile
TEXT_ROOM = 4096  # the chat's cache holds the media tokens and this much text (within the context)


class TooLong(ValueError):
  """A question that cannot fit the model's context even with every earlier turn dropped."""


class Streamer:
  """An `on_tokens` callback for `generate`: `on_text` receives the answer's visible text each time
  a chunk of tokens comes (held back where a stop string may start)."""

  def __init__(self, tokenizer, stop_ids, on_text, stop_strings=()):
    self.tokenizer, self.stop_ids, self.on_text, self.stop_strings = tokenizer, stop_ids, on_text, stop_strings
    self.tokens, self.text = [], ""

  def __call__(self, chunk) -> None:
    self.tokens.extend(int(t) for t in chunk[0] if t not in self.stop_ids)
    self.text = visible_prefix(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stop_strings)
    self.on_text(self.text)


class MediaChat:
  """One conversation about loaded `media` (`system.load_media`), with its audio when `use_audio`
  and the media have a usable track."""

  def __init__(self, system, media, use_audio: bool):
    self.system, self.media = system, media
    self.with_audio = use_audio and media.audio_valid
    self.audio_missing = use_audio and not media.is_image and not media.audio_valid  # asked for, not there
    self.conv = system.conversation(media, self.with_audio)
    self.tokens = system.encode_media([media], use_audio=self.with_audio)
    llama = system.config.llama
    self.context = llama.max_position_embeddings
    self.room = f"the model's context of {self.context}"
    # A long video's turn sets the cache size (an hour at 2 tokens per frame: 7,200, with a movie's
    # subtitles more), not the context (65,536 for long-video models), which may not fit in memory.
    media_tokens = len(system.prompt_ids(self.conv.media, media))
    if media_tokens + TEXT_ROOM < self.context:
      self.context = media_tokens + TEXT_ROOM
      self.room = f"the chat's {self.context} tokens (the media turn's {media_tokens} and {TEXT_ROOM} for text)"
    # Slots to spare for the Session's left padding of each turn (positions stay within the context).
    self.session = generate.Session(llama, system.params["llm"], max_len=self.context + 2 * BUCKET, bucket=BUCKET)
    self.turns = 0  # answers given, over every conversation about these media

  def describe(self) -> str:
    """'image', or the video's frame times (their range when there are many), and whether the audio is used."""
    times = self.media.frames.timestamps
    if self.media.is_image:
      what = "image"
    elif self.media.movie is not None:
      what = f"long video from a feature file, {len(times)} frames with their subtitles"
    elif len(times) > 16:
      what = f"video, {len(times)} frames from {times[0]} to {times[-1]} s"
    else:
      what = f"video, frames at {', '.join(str(t) for t in times)} s"
    return what + (", with audio" if self.with_audio else "")

  def reset(self) -> None:
    """A new conversation about the same media (the cache keeps what the new prompts share)."""
    self.conv = self.system.conversation(self.media, self.with_audio)

  def ask(self, question: str, max_new_tokens: int, sampling, seed: int, on_text=None) -> tuple[str, int]:
    """The answer to `question` (the next turn) and how many of the oldest turns were dropped to
    fit; `on_text` receives the answer's visible text as it grows (a `Streamer`), then the whole
    generated text (cut at a stop string) when it extends the last one. Raises TooLong."""
    system, stop_strings = self.system, self.system.template.stop_strings
    stream = Streamer(system.tokenizer, system.stop_ids, on_text, stop_strings) if on_text else None
    before = copy.deepcopy(self.conv)
    self.conv.ask(question)
    dropped = 0
    while True:
      ids = system.prompt_ids(self.conv.prompt(), self.media)
      if len(ids) + max_new_tokens <= self.context:
        try:
          out = self.session.generate(ids, system.embed([ids], self.tokens, [self.conv]),
                                      max_new_tokens=max_new_tokens, sampling=sampling,
                                      stop_token_ids=system.stop_ids, stop_strings=stop_strings,
                                      tokenizer=system.tokenizer, seed=seed, on_tokens=stream)
          break
        except generate.ContextFullError:  # padding of earlier turns: start again after the media
          pass
      if not self.conv.drop_oldest_turn():
        self.conv = before
        raise TooLong(f"the media and this question take {len(ids)} tokens; with {max_new_tokens} new tokens "
                      f"they do not fit {self.room}")
      dropped += 1
    if on_text and out.texts[0].startswith(stream.text):  # a held-back tail that did not start a stop string
      on_text(out.texts[0])
    answer = system.clean_answer(out.texts[0])
    self.conv.answer(answer)
    self.turns += 1
    return answer, dropped
