"""What the server answers with: requests -> prompts (ids, embeddings), answers -> text.

A video system answers prompts with or without one image or video; a plain LLaMA answers text.
Chat prompts go in the system's conversation template (a plain LLaMA: its tokenizer's chat
template, else vicuna_v1's); completion prompts are taken as they are. Encoded media are kept by
the file's content hash (least recently used out first, bounded in bytes), so many questions about
one video decode and encode it once.
"""

import collections
import dataclasses
import threading
from typing import Callable

import jax
import numpy as np

from vllm_jax.data import conversation as conv_lib
from vllm_jax.data.media import Media, MediaError
from vllm_jax.generate import SamplingConfig
from vllm_jax.serve import media as media_urls

ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
PAD_MULTIPLE = 32  # prompts are embedded at lengths rounded up to this: few compiled shapes


class RequestError(Exception):
  """A request answered with an error: its HTTP status, message, OpenAI error type and code."""

  def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", code: str | None = None):
    super().__init__(message)
    self.status, self.kind, self.code = status, kind, code


@dataclasses.dataclass(frozen=True)
class Defaults:
  """What a request that leaves a field out gets (the command's flags)."""
  max_tokens: int = 128
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0


@dataclasses.dataclass
class Prompt:
  """A checked request, ready for the engine: its ids, how to embed them (None: the engine embeds
  the ids) and how its answers end and read."""
  ids: list[int]
  embeds: Callable[[], jax.Array] | None
  max_tokens: int
  sampling: SamplingConfig
  seed: int
  stop: tuple[str, ...]     # stop strings: the template's and the request's
  chat: bool                # chat answers are cleaned as the template says; completions are kept as they are


class MediaCache:
  """Decoded and encoded media by (content hash, settings), least recently used out first."""

  def __init__(self, max_bytes: float):
    self.max_bytes, self.items = max_bytes, collections.OrderedDict()
    self.lock = threading.Lock()
    self.counts = collections.Counter()  # hits, misses (encodes)

  def get(self, key):
    with self.lock:
      if key in self.items:
        self.items.move_to_end(key)
        return self.items[key][0]
      return None

  def put(self, key, value, nbytes: int) -> None:
    with self.lock:
      self.items[key] = (value, nbytes)
      while self.items and self.nbytes > self.max_bytes:
        self.items.popitem(last=False)

  @property
  def nbytes(self) -> int:
    return sum(n for _, n in self.items.values())


def _nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


class Model:
  """A loaded model behind the HTTP API: a video system or a plain LLaMA (system None)."""

  def __init__(self, name: str, tokenizer, llama_config, llm_params, system=None, use_audio: bool = False,
               num_frames: int | None = None, defaults: Defaults = Defaults(),
               media_policy: media_urls.MediaPolicy = media_urls.MediaPolicy(), media_cache_mb: float = 1024):
    self.name, self.tokenizer, self.system, self.defaults = name, tokenizer, system, defaults
    self.llama, self.llm_params = llama_config, llm_params
    self.use_audio, self.num_frames, self.media_policy = use_audio, num_frames, media_policy
    self.media_cache = MediaCache(media_cache_mb * 2**20)
    self.template = system.template if system is not None else conv_lib.VICUNA_V1
    self.chat_template = system is None and bool(getattr(tokenizer, "chat_template", None))
    self.context = llama_config.max_position_embeddings
    self.stop_strings = () if self.chat_template else self.template.stop_strings
    if system is not None:
      self.stop_ids = system.stop_ids
    else:
      eos = llama_config.eos_token_id
      eos = eos if isinstance(eos, tuple) else (eos,)
      self.stop_ids = sorted({i for i in (tokenizer.eos_token_id, *eos) if isinstance(i, int)})

  @classmethod
  def from_system(cls, name: str, system, use_audio: bool = False, num_frames: int | None = None, **kwargs):
    return cls(name, system.tokenizer, system.config.llama, system.params["llm"], system, use_audio, num_frames,
               **kwargs)

  # --- requests -> prompts (request threads) --------------------------------------------------

  def chat_prompt(self, messages: list[dict], options: dict) -> Prompt:
    """OpenAI chat `messages` (checked by the schema) and sampling options -> a Prompt."""
    system_text, turns, urls = parse_messages(messages)
    placeholders = self.system.placeholder_tokens if self.system is not None else ()
    for text in [system_text or ""] + [t for _, t in turns]:
      for p in placeholders:
        if p in text:
          raise RequestError(f"the messages contain {p}, this model's media placeholder: attach the media as an "
                             "image_url or video_url part instead")
    if urls:
      media, key = self._media(urls)
      conv = self.system.conversation(media, self.use_audio and media.audio_valid)
    elif self.chat_template:
      history = [{"role": "system", "content": system_text}] if system_text is not None else []
      history += [{"role": role, "content": text} for role, text in turns]
      try:
        text = self.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
      except Exception as e:  # the template's own checks (jinja raises its own exception types)
        raise RequestError(f"the tokenizer's chat template rejects these messages: {e}") from None
      return self._prompt(self.tokenizer(text, add_special_tokens=False).input_ids, None, options, chat=True)
    else:
      conv = conv_lib.Conversation(self.template)
    if system_text is not None:
      conv.system = system_text
    for role, text in turns:
      (conv.ask if role == "user" else conv.answer)(text)
    if not urls:
      return self._prompt(self._bos() + self.tokenizer(conv.prompt(), add_special_tokens=False).input_ids, None,
                          options, chat=True)
    ids = self.system.prompt_ids(conv.prompt(), media)
    return self._prompt(ids, lambda: self._embed(ids, media, key, conv), options, chat=True)

  def completion_prompt(self, text: str, options: dict) -> Prompt:
    """A completion prompt, taken as it is (BOS first) -> a Prompt."""
    return self._prompt(self._bos() + self.tokenizer(text, add_special_tokens=False).input_ids, None, options,
                        chat=False)

  def _bos(self) -> list[int]:
    return [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

  def _prompt(self, ids, embeds, options: dict, chat: bool) -> Prompt:
    d = self.defaults
    max_tokens = options.get("max_tokens")
    if max_tokens is None:  # not asked for: the default, within the context
      max_tokens = min(d.max_tokens, self.context - len(ids))
      if max_tokens < 1:
        raise RequestError(f"the prompt takes {len(ids)} tokens, the model's context is {self.context}")
    elif len(ids) + max_tokens > self.context:
      raise RequestError(f"the prompt takes {len(ids)} tokens; with max_tokens {max_tokens} it does not fit the "
                         f"model's context of {self.context}")
    temperature = _given(options.get("temperature"), d.temperature)
    # Greedy ignores top-k/top-p.
    sampling = SamplingConfig(temperature, _given(options.get("top_k"), d.top_k),
                              _given(options.get("top_p"), d.top_p)) if temperature > 0 else SamplingConfig()
    stop = tuple(options.get("stop") or ())
    return Prompt(ids, embeds, max_tokens, sampling, _given(options.get("seed"), d.seed),
                  (self.stop_strings if chat else ()) + stop, chat)

  def _media(self, urls: list[str]) -> tuple[Media, tuple]:
    """A video's or an image's URL, or the URLs of a clip's frames -> (its Media, its cache key);
    decoded once per content."""
    if self.system is None:
      raise RequestError(f"{self.name} is a text-only LLaMA: it cannot read images or videos")
    files = []
    try:
      for url in urls:
        files.append(media_urls.fetch(url, self.media_policy))
      file = files[0] if len(files) == 1 else media_urls.frames_video(files)
    except media_urls.MediaRefused as e:
      for fetched in files:
        fetched.close()
      raise RequestError(str(e), e.status) from None
    if len(files) > 1:
      for frame in files:  # they are in the video now
        frame.close()
    key = (file.digest, self.use_audio, self.num_frames)
    try:
      cached = self.media_cache.get(key)
      if cached is not None:
        return cached[0], key
      media = self.system.load_media(file.path, use_audio=self.use_audio, num_frames=self.num_frames)
      return dataclasses.replace(media, path=""), key  # the server's path never goes back to a client
    except (FileNotFoundError, MediaError, ValueError) as e:  # undecodable, or a frame count the system cannot take
      raise RequestError(str(e).replace(file.path, "the media")) from None
    finally:
      file.close()

  # --- prompts -> embeddings (the engine thread) ----------------------------------------------

  def _embed(self, ids: list[int], media: Media, key: tuple, conv) -> np.ndarray:
    """The prompt's embeddings [1, P, E], its media encoded unless cached."""
    cached = self.media_cache.get(key)
    if cached is None:
      self.media_cache.counts["misses"] += 1
      tokens = self.system.encode_media([media], use_audio=self.use_audio)
      self.media_cache.put(key, (media, tokens), _nbytes(tokens) + _nbytes([*vars(media.frames).values(), media.audio]))
    else:
      self.media_cache.counts["hits"] += 1
      tokens = cached[1]
    pad = -len(ids) % PAD_MULTIPLE
    padded = np.asarray([[self.tokenizer.pad_token_id or 0] * pad + ids])
    return np.asarray(self.system.embed(padded, tokens, [conv]))[:, pad:]  # cut on the host: no compile per pad

  # --- tokens -> text -------------------------------------------------------------------------

  def finish(self, prompt: Prompt, tokens: list[int]) -> tuple[str, str, int]:
    """A row's generated ids -> (answer, finish reason, tokens counted), cut at max_tokens, the first
    stop token or the first stop string."""
    tokens = tokens[:prompt.max_tokens]
    stop = next((k + 1 for k, t in enumerate(tokens) if t in self.stop_ids), None)
    tokens, reason = tokens[:stop], "stop" if stop else "length"
    text = self._decode(tokens)
    if any(s in text for s in prompt.stop):
      reason = "stop"
      tokens = tokens[:next(k for k in range(1, len(tokens) + 1) if any(s in self._decode(tokens[:k])
                                                                      for s in prompt.stop))]
    return self._clean(prompt, conv_lib.cut_at_stops(text, prompt.stop)), reason, len(tokens)

  def visible(self, prompt: Prompt, tokens: list[int]) -> str:
    """The part of a streaming row's answer that is final: cut as `finish` cuts it, without a tail
    that may still change (the start of a stop string, a partial character, trailing spaces)."""
    tokens = tokens[:prompt.max_tokens]
    stop = next((k for k, t in enumerate(tokens) if t in self.stop_ids), None)
    text = self._decode(tokens[:stop])
    partial = min(len(text) - len(text.rstrip("\ufffd")), 3)  # the bytes of an unfinished character (at most 3)
    return self._clean(prompt, conv_lib.visible_prefix(text[:len(text) - partial], prompt.stop))

  def stops(self, prompt: Prompt, tokens: list[int]) -> bool:
    """Whether the text so far holds a stop string (the engine then ends the row)."""
    return any(s in self._decode(tokens) for s in prompt.stop)

  def token_text(self, token: int) -> str:
    return self.tokenizer.decode([token])

  def _decode(self, tokens: list[int]) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=True)

  def _clean(self, prompt: Prompt, text: str) -> str:
    if not prompt.chat:
      return text
    return text.strip() if self.chat_template else conv_lib.clean_answer(self.template, text)


def _given(value, default):
  return default if value is None else value


def parse_messages(messages: list[dict]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
  """OpenAI `messages` (as the schema checked them) -> (the system text or None, [(role, text)]
  alternating user/assistant and ending with a user turn, the media URLs of the one message with media)."""
  system_text, turns, urls = None, [], []
  for i, message in enumerate(messages):
    role = message["role"]
    text, media = _content(message.get("content"), f"messages[{i}]")
    if media and role != "user":
      raise RequestError(f"messages[{i}]: images and videos go in user messages")
    if media:
      urls.append(media)
    if role in ("system", "developer"):
      system_text = text if system_text is None else system_text + "\n" + text
    else:
      turns.append((role, text))
  if len(turns) % 2 == 0 or [role for role, _ in turns] != (["user", "assistant"] * len(turns))[:len(turns)]:
    raise RequestError("the user and assistant messages must alternate, starting and ending with a user message")
  if len(urls) > 1:
    raise RequestError(f"one image or video per conversation, got media in {len(urls)} messages")
  return system_text, turns, urls[0] if urls else []


def _content(content, where: str) -> tuple[str, list[str]]:
  """A message's content (a string, null, or a list of text/image_url/video_url parts) -> (text, media
  URLs: one video, one image, or images that are a clip's frames)."""
  if content is None:
    return "", []
  if isinstance(content, str):
    return content, []
  texts, urls = [], []
  for j, part in enumerate(content):
    kind = part["type"]
    if kind == "text":
      texts.append(part["text"])
    else:
      ref = part[kind]
      url = ref.get("url") if isinstance(ref, dict) else ref
      if not isinstance(url, str) or not url:
        raise RequestError(f'{where}.content[{j}].{kind} must be {{"url": "..."}}')
      urls.append((kind, url))
  if len(urls) > 1 and any(kind != "image_url" for kind, _ in urls):
    raise RequestError(f"{where}: one image or video, or several images (a clip's frames), got {len(urls)} parts")
  return "\n".join(texts), [url for _, url in urls]
