"""An OpenAI-compatible chat server (`vllm-jax serve`): `POST /v1/chat/completions`, batched.

The standard library's ThreadingHTTPServer serves it: the HTTP layer is thin and the batching is ours.

  request thread: parse the body, load and check the media, tokenize the prompt -> a `Job` in the
                  queue (a full queue: 503, so that clients back off and retry)
  worker thread:  take up to `max_batch` jobs that can share a batch (waiting up to `batch_wait_ms`
                  for more), answer them together in `max_batch` rows (one compiled shape for every
                  batch), send each streaming job its new text after every chunk of tokens, then
                  each job its result

Jobs share a batch when they have the same sampling settings (and seed, when sampling) and all
have media or none; the batch runs to its longest max_tokens and each row is cut at its own.
Prompts without media are answered by the LLM alone: in the system's conversation template for a
video model, in the tokenizer's chat template (else vicuna_v1's) for a plain LLaMA.

Media URLs may be local paths and file:// URLs, which the server reads: it listens on 127.0.0.1
unless told otherwise.
"""

import base64
import binascii
import collections
import dataclasses
import json
import mimetypes
import os
import queue
import re
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from vllm_jax import generate
from vllm_jax.data import conversation as conv_lib
from vllm_jax.data.media import Media, MediaError
from vllm_jax.data.tokenizer import left_pad
from vllm_jax.data.video import IMAGE_EXTENSIONS

ROLES = ("system", "user", "assistant")


class RequestError(Exception):
  """A request answered with an error: its HTTP status, message and OpenAI error type."""

  def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.kind = status, kind


@dataclasses.dataclass
class Result:
  text: str
  finish_reason: str          # "stop" (a stop token or string) or "length" (max_tokens reached)
  completion_tokens: int
  batch_size: int             # requests answered in the same batch


@dataclasses.dataclass(eq=False)  # compared by identity (the queue removes jobs by it)
class Job:
  """One checked and tokenized request, waiting for its batch; the worker puts ("delta", text)
  events (streaming), then ("done", Result) or ("error", RequestError) on `events`."""
  ids: list[int]                                # the prompt's token ids, media runs expanded
  conversation: conv_lib.Conversation | None    # with media: what `System.answer` takes
  media: Media | None
  max_tokens: int
  sampling: generate.SamplingConfig
  seed: int
  stop: tuple[str, ...]                         # the request's own stop strings
  stream: bool
  model: str                                    # the request's model name, echoed
  temp_file: str | None = None                  # a data URL's decoded file, removed by `close`
  events: queue.Queue = dataclasses.field(default_factory=queue.Queue)

  @property
  def key(self) -> tuple:
    """Jobs with equal keys can share a batch (one sampler, one seed, one media encoder call)."""
    return self.media is not None, self.sampling, self.seed if self.sampling.temperature > 0 else None

  def close(self) -> None:
    if self.temp_file and os.path.exists(self.temp_file):
      os.remove(self.temp_file)


@dataclasses.dataclass(frozen=True)
class Defaults:
  """What a request that leaves a field out gets (the command's flags)."""
  max_tokens: int = 128
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0


class Model:
  """What the server answers with: a video system (prompts with or without one image or video)
  or a plain LLaMA (text prompts)."""

  def __init__(self, name: str, tokenizer, llama_config, llm_params, system=None, use_audio: bool = False,
               num_frames: int | None = None, defaults: Defaults = Defaults()):
    self.name, self.tokenizer, self.system, self.defaults = name, tokenizer, system, defaults
    self.llama, self.llm_params = llama_config, llm_params
    self.use_audio, self.num_frames = use_audio, num_frames
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
  def from_system(cls, name: str, system, use_audio: bool = False, num_frames: int | None = None,
                  defaults: Defaults = Defaults()) -> "Model":
    return cls(name, system.tokenizer, system.config.llama, system.params["llm"], system, use_audio, num_frames,
               defaults)

  # --- request threads ------------------------------------------------------------------------

  def prepare(self, body) -> Job:
    """A request body (parsed JSON) -> a Job, its media loaded. Raises RequestError (400)."""
    if not isinstance(body, dict):
      raise RequestError("the body must be a JSON object")
    system_text, turns, urls = parse_messages(body.get("messages"))
    placeholders = self.system.placeholder_tokens if self.system is not None else ()
    for text in [system_text or ""] + [t for _, t in turns]:
      for p in placeholders:
        if p in text:
          raise RequestError(f"the messages contain {p}, this model's media placeholder: attach the media as an "
                             "image_url or video_url part instead")
    sampling, seed, stop, stream, max_tokens = self._options(body)
    model = body.get("model") if isinstance(body.get("model"), str) else self.name
    media, temp_file = None, None
    try:
      if urls:
        media, temp_file = self._load(urls[0])
      ids, conversation = self._prompt(system_text, turns, media)
      if max_tokens is None:  # not asked for: the default, within the context
        max_tokens = min(self.defaults.max_tokens, self.context - len(ids))
        if max_tokens < 1:
          raise RequestError(f"the prompt takes {len(ids)} tokens, the model's context is {self.context}")
      elif len(ids) + max_tokens > self.context:
        raise RequestError(f"the prompt takes {len(ids)} tokens; with max_tokens {max_tokens} it does not fit "
                           f"the model's context of {self.context}")
    except RequestError:
      if temp_file:
        os.remove(temp_file)
      raise
    return Job(ids, conversation, media, max_tokens, sampling, seed, stop, stream, model, temp_file)

  def _options(self, body: dict):
    """-> (sampling, seed, stop strings, stream, max_tokens or None) from the body's fields."""
    d = self.defaults
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, key, int, None, low=1)
    temperature = _field(body, "temperature", float, d.temperature, low=0)
    top_p = _field(body, "top_p", float, d.top_p, low=0, high=1, low_open=True)
    top_k = _field(body, "top_k", int, d.top_k, low=0)
    seed = _field(body, "seed", int, d.seed)
    if _field(body, "n", int, 1) != 1:
      raise RequestError('"n": only one choice per request is supported')
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
      raise RequestError('"stream" must be true or false')
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
      raise RequestError('"stop" must be a string or a list of non-empty strings')
    # Greedy ignores top-k/top-p: one sampler (one compiled decoder) for every greedy request.
    sampling = generate.SamplingConfig(temperature, top_k, top_p) if temperature > 0 else generate.SamplingConfig()
    return sampling, seed, tuple(stop), stream, max_tokens

  def _load(self, url: str) -> tuple[Media, str | None]:
    """A media URL -> (Media, the temporary file of a data URL or None)."""
    if self.system is None:
      raise RequestError(f"{self.name} is a text-only LLaMA: it cannot read images or videos")
    path, temp_file, shown = media_file(url)
    try:
      return self.system.load_media(path, use_audio=self.use_audio, num_frames=self.num_frames), temp_file
    except FileNotFoundError:
      message = f"media file not found: {shown}"
    except (MediaError, ValueError) as e:  # undecodable, or a frame count the system cannot take
      message = str(e).replace(path, shown)
    if temp_file:
      os.remove(temp_file)
    raise RequestError(message)

  def _prompt(self, system_text: str | None, turns: list[tuple[str, str]], media: Media | None):
    """-> (prompt ids, the Conversation for `System.answer` or None without media)."""
    if media is not None:
      conv = self.system.conversation(media, self.use_audio and media.audio_valid)
    elif self.chat_template:
      messages = [{"role": "system", "content": system_text}] if system_text is not None else []
      messages += [{"role": role, "content": text} for role, text in turns]
      try:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
      except Exception as e:  # the template's own checks (jinja raises its own exception types)
        raise RequestError(f"the tokenizer's chat template rejects these messages: {e}") from None
      return self.tokenizer(text, add_special_tokens=False).input_ids, None
    else:
      conv = conv_lib.Conversation(self.template)
    if system_text is not None:
      conv.system = system_text
    for role, text in turns:
      (conv.ask if role == "user" else conv.answer)(text)
    if media is not None:
      return self.system.prompt_ids(conv.prompt(), media), conv
    bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
    return bos + self.tokenizer(conv.prompt(), add_special_tokens=False).input_ids, None

  # --- the worker thread ----------------------------------------------------------------------

  def generate(self, jobs: list[Job], rows: int, on_tokens) -> None:
    """Answer `jobs` (one key) in `rows` rows; `on_tokens` gets each chunk of new ids [rows, n]."""
    first, limit = jobs[0], max(j.max_tokens for j in jobs)
    if first.media is not None:
      self.system.answer([j.media for j in jobs], [j.conversation for j in jobs], use_audio=self.use_audio,
                         max_new_tokens=limit, sampling=first.sampling, seed=first.seed, rows=rows,
                         on_tokens=on_tokens)
      return
    prompts = [j.ids for j in jobs]
    ids, mask = left_pad(prompts + prompts[:1] * (rows - len(prompts)), multiple=32)
    generate.generate(self.llama, self.llm_params, input_ids=ids, attention_mask=mask, max_new_tokens=limit,
                      sampling=first.sampling, stop_token_ids=self.stop_ids, stop_strings=self.stop_strings,
                      tokenizer=self.tokenizer, seed=first.seed, on_tokens=on_tokens)

  def finish(self, job: Job, tokens: list[int]) -> tuple[str, str, int]:
    """A row's generated ids -> (answer, finish reason, tokens counted), cut at the job's
    max_tokens, its first stop token or first stop string (as `System.answer` cuts its answers)."""
    tokens = tokens[:job.max_tokens]
    stop = next((k + 1 for k, t in enumerate(tokens) if t in self.stop_ids), None)
    tokens, reason = tokens[:stop], "stop" if stop else "length"
    stops = self.stop_strings + job.stop
    text = self._decode(tokens)
    if any(s in text for s in stops):
      reason = "stop"
      tokens = tokens[:next(k for k in range(1, len(tokens) + 1) if any(s in self._decode(tokens[:k]) for s in stops))]
    return self._clean(conv_lib.cut_at_stops(text, stops)), reason, len(tokens)

  def visible(self, job: Job, tokens: list[int]) -> str:
    """The part of a streaming row's answer that is final: cut as `finish` cuts it, without a tail
    that may still change (the start of a stop string, a partial character, trailing spaces)."""
    tokens = tokens[:job.max_tokens]
    stop = next((k for k, t in enumerate(tokens) if t in self.stop_ids), None)
    text = self._decode(tokens[:stop])
    partial = min(len(text) - len(text.rstrip("\ufffd")), 3)  # the bytes of an unfinished character (at most 3)
    return self._clean(conv_lib.visible_prefix(text[:len(text) - partial], self.stop_strings + job.stop))

  def _decode(self, tokens: list[int]) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=True)

  def _clean(self, text: str) -> str:
    return text.strip() if self.chat_template else conv_lib.clean_answer(self.template, text)


def _field(body: dict, key: str, kind, default, low=None, high=None, low_open=False):
  """body[key] as `kind` within [low, high] ((low, high] with `low_open`); absent or null: `default`."""
  value = body.get(key)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
    raise RequestError(f'"{key}" must be {"an integer" if kind is int else "a number"}, got {json.dumps(value)}')
  if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
    bounds = f"in {'(' if low_open else '['}{low}, {high}]" if high is not None else f"at least {low}"
    raise RequestError(f'"{key}" must be {bounds}, got {value}')
  return kind(value)


def parse_messages(messages) -> tuple[str | None, list[tuple[str, str]], list[str]]:
  """OpenAI `messages` -> (the system text or None, [(role, text)] alternating user/assistant and
  ending with a user turn, media URLs: at most one)."""
  if not isinstance(messages, list) or not messages:
    raise RequestError('"messages" must be a non-empty list')
  system_text, turns, urls = None, [], []
  for i, message in enumerate(messages):
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ROLES:
      raise RequestError(f"messages[{i}]: expected an object with a role of {', '.join(ROLES)}")
    text, media = _content(message.get("content"), f"messages[{i}]")
    if media and role != "user":
      raise RequestError(f"messages[{i}]: images and videos go in user messages")
    urls += media
    if role == "system":
      system_text = text if system_text is None else system_text + "\n" + text
    else:
      turns.append((role, text))
  if len(turns) % 2 == 0 or [role for role, _ in turns] != (["user", "assistant"] * len(turns))[:len(turns)]:
    raise RequestError("the user and assistant messages must alternate, starting and ending with a user message")
  if len(urls) > 1:
    raise RequestError(f"one image or video per conversation, got {len(urls)}")
  return system_text, turns, urls


def _content(content, where: str) -> tuple[str, list[str]]:
  """A message's content (a string, or a list of text/image_url/video_url parts) -> (text, URLs)."""
  if isinstance(content, str):
    return content, []
  if not isinstance(content, list):
    raise RequestError(f"{where}.content must be a string or a list of parts")
  texts, urls = [], []
  for j, part in enumerate(content):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
      texts.append(part["text"])
    elif kind in ("image_url", "video_url"):
      ref = part.get(kind)
      url = ref.get("url") if isinstance(ref, dict) else ref
      if not isinstance(url, str) or not url:
        raise RequestError(f'{where}.content[{j}].{kind} must be {{"url": "..."}}')
      urls.append(url)
    else:
      raise RequestError(f"{where}.content[{j}]: expected a text, image_url or video_url part")
  return "\n".join(texts), urls


def media_file(url: str) -> tuple[str, str | None, str]:
  """A media URL -> (a local path, the temporary file written for a data URL or None, the name
  errors show). Local paths, file:// URLs and base64 data URLs (image/* or video/*)."""
  if url.startswith("data:"):
    header, comma, payload = url[5:].partition(",")
    mime = header.split(";")[0].lower()
    if not comma or not header.endswith(";base64"):
      raise RequestError("a data URL must be data:<type>;base64,<data>")
    if mime.startswith("image/"):
      suffix = mimetypes.guess_extension(mime)
      if suffix not in IMAGE_EXTENSIONS:
        raise RequestError(f"unsupported image type in a data URL: {mime}")
    elif mime.startswith("video/"):
      suffix = ".mp4"  # videos are decoded by their content, whatever the name
    else:
      raise RequestError(f"a data URL must hold an image/* or video/* type, got {mime or 'none'}")
    try:
      data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
      raise RequestError(f"the {mime} data URL is not valid base64") from None
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="vllm-jax-serve-")
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    return path, path, f"the {mime} data URL"
  if url.startswith("file://"):
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
      raise RequestError(f"a file:// URL must name a file on this machine, got host {parts.netloc!r}")
    path = url2pathname(unquote(parts.path))
    return path, None, path
  scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
  if scheme:
    raise RequestError(f"unsupported media URL scheme {scheme.group(1)}:// (the server does not download): give a "
                       "local path, a file:// URL or a data: URL")
  return url, None, url


class Server:
  """The HTTP server and the batching worker around a `Model` (which may be set after the server
  is made: it listens at once, so that a busy port fails before a model loads)."""

  def __init__(self, model: Model | None, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 4,
               batch_wait_ms: float = 20, queue_size: int = 32, max_body_mb: float = 64):
    self.model, self.max_batch, self.queue_size = model, max_batch, queue_size
    self.batch_wait, self.max_body_mb = batch_wait_ms / 1000, max_body_mb
    self.http = ThreadingHTTPServer((host, port), Handler)  # binds now: a busy port fails here
    self.http.daemon_threads = True
    self.http.app = self
    self.pending: collections.deque[Job] = collections.deque()
    self.cond = threading.Condition()
    self.stopping, self.serving = False, False
    self.running = 0
    self.counts = collections.Counter()           # requests answered, failed, batches
    self.batch_sizes = collections.Counter()
    self.created = int(time.time())
    self.worker = threading.Thread(target=self._work, name="vllm-jax-batcher", daemon=True)
    self.worker.start()

  @property
  def url(self) -> str:
    host, port = self.http.server_address[:2]
    return f"http://{host}:{port}"

  def serve_forever(self) -> None:
    self.serving = True
    self.http.serve_forever(poll_interval=0.1)  # how soon `close` takes effect

  def start(self) -> "Server":
    """Serve from a background thread (`close` stops it)."""
    self.serving = True
    threading.Thread(target=self.serve_forever, name="vllm-jax-http", daemon=True).start()
    return self

  def close(self) -> None:
    """Stop serving; requests still waiting for a batch are answered 503."""
    with self.cond:
      self.stopping = True
      for job in self.pending:
        job.events.put(("error", RequestError("the server is shutting down", 503, "server_error")))
      self.pending.clear()
      self.cond.notify_all()
    if self.serving:  # shutdown waits for serve_forever to return: without one it would wait for ever
      self.http.shutdown()
    self.http.server_close()

  def submit(self, job: Job) -> None:
    with self.cond:
      if self.stopping:
        raise RequestError("the server is shutting down", 503, "server_error")
      if len(self.pending) >= self.queue_size:
        raise RequestError(f"the server is busy: {len(self.pending)} requests are waiting (the queue holds "
                           f"{self.queue_size}); retry later", 503, "server_overloaded")
      self.pending.append(job)
      self.cond.notify()

  def metrics(self) -> dict:
    with self.cond:
      return {"requests": self.counts["requests"], "failed": self.counts["failed"], "batches": self.counts["batches"],
              "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
              "queued": len(self.pending), "running": self.running}

  def _take(self) -> list[Job] | None:
    """The next batch: the oldest job and the jobs that can share its batch, at most max_batch,
    after waiting up to batch_wait for them. None when the server stops."""
    with self.cond:
      while not self.pending:
        if self.stopping:
          return None
        self.cond.wait()
      key = self.pending[0].key
      deadline = time.monotonic() + self.batch_wait
      while sum(j.key == key for j in self.pending) < self.max_batch and not self.stopping:
        left = deadline - time.monotonic()
        if left <= 0:
          break
        self.cond.wait(left)
      if self.stopping:
        return None
      batch = [j for j in self.pending if j.key == key][:self.max_batch]
      for job in batch:
        self.pending.remove(job)
      self.running = len(batch)
      return batch

  def _work(self) -> None:
    while (batch := self._take()) is not None:
      self._answer(batch)

  def _answer(self, batch: list[Job]) -> None:
    rows = [[] for _ in batch]
    shown = [""] * len(batch)

    def on_tokens(chunk):  # [max_batch, n] new ids
      for i, job in enumerate(batch):
        rows[i] += [int(t) for t in chunk[i]]
        if job.stream:
          text = self.model.visible(job, rows[i])
          if len(text) > len(shown[i]) and text.startswith(shown[i]):
            job.events.put(("delta", text[len(shown[i]):]))
            shown[i] = text

    try:
      self.model.generate(batch, self.max_batch, on_tokens)
      results = [Result(*self.model.finish(job, tokens), len(batch)) for job, tokens in zip(batch, rows)]
    except Exception as e:  # a failed batch fails its requests, never the server
      error = RequestError(f"generation failed: {type(e).__name__}: {e}", 500, "server_error")
      results = [error] * len(batch)
    with self.cond:
      self.running = 0
      self.counts["batches"] += 1
      self.batch_sizes[len(batch)] += 1
      self.counts["failed" if isinstance(results[0], RequestError) else "requests"] += len(batch)
    for job, result in zip(batch, results):
      job.events.put(("error", result) if isinstance(result, RequestError) else ("done", result))


class Handler(BaseHTTPRequestHandler):
  server_version = "vllm-jax"

  @property
  def app(self) -> Server:
    return self.server.app

  def do_GET(self):
    path = self.path.partition("?")[0]
    if path == "/health":
      self._json(200, {"status": "ok"})
    elif path == "/v1/models":
      model = {"id": self.app.model.name, "object": "model", "created": self.app.created, "owned_by": "vllm_jax"}
      self._json(200, {"object": "list", "data": [model]})
    elif path == "/metrics":
      self._json(200, self.app.metrics())
    else:
      self._not_found(path)

  def do_POST(self):
    path = self.path.partition("?")[0]
    if path != "/v1/chat/completions":
      self._not_found(path)
      return
    job = None
    try:
      job = self.app.model.prepare(self._body())
      self.app.submit(job)
      if job.stream:
        self._stream(job)
      else:
        result = self._result(job)
        message = {"role": "assistant", "content": result.text}
        self._json(200, {**_head(job, "chat.completion"), "choices": [
            {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(job, result), "batch_size": result.batch_size})
    except RequestError as e:
      self._error(e)
    finally:
      if job is not None:
        job.close()

  def _not_found(self, path: str) -> None:
    known = {"/health": "GET", "/v1/models": "GET", "/metrics": "GET", "/v1/chat/completions": "POST"}
    if path in known:
      self._error(RequestError(f"{path} takes {known[path]}, not {self.command}", 405))
    else:
      self._error(RequestError(f"no such path: {path} (try POST /v1/chat/completions)", 404))

  def _body(self):
    """The parsed JSON body; one over max_body is read (so that the client sees the answer) and refused."""
    try:
      length = int(self.headers.get("Content-Length") or 0)
    except ValueError:
      length = -1
    if length < 0:
      raise RequestError("bad Content-Length header")
    if length > self.app.max_body_mb * 2**20:
      while length > 0 and (piece := self.rfile.read(min(length, 2**20))):
        length -= len(piece)
      raise RequestError(f"the body is over {self.app.max_body_mb:g} MB (--max-body-mb)", 413)
    try:
      return json.loads(self.rfile.read(length))
    except ValueError as e:  # bad JSON or bad UTF-8
      raise RequestError(f"the body is not valid JSON: {e}") from None

  def _result(self, job: Job) -> Result:
    """Wait for the job's result (skipping stream deltas)."""
    while True:
      kind, value = job.events.get()
      if kind == "done":
        return value
      if kind == "error":
        raise value

  def _stream(self, job: Job) -> None:
    """Server-sent events: a role chunk, content chunks as the text grows, a chunk with the
    finish reason and usage, then [DONE]. A client that leaves is let go; its job still finishes
    (its media file is in use until then)."""
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.end_headers()
    head, sent, gone = _head(job, "chat.completion.chunk"), "", False

    def send(data) -> None:
      nonlocal gone
      if not gone:
        try:
          self.wfile.write(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())
          self.wfile.flush()
        except OSError:  # the client closed the connection
          gone = True

    def chunk(delta: dict, finish_reason=None, **extra) -> dict:
      return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
              **extra}

    send(chunk({"role": "assistant", "content": ""}))
    while True:
      kind, value = job.events.get()
      if kind == "delta":
        send(chunk({"content": value}))
        sent += value
        continue
      if kind == "error":
        send({"error": {"message": str(value), "type": value.kind, "code": value.status}})
      else:
        if value.text.startswith(sent) and len(value.text) > len(sent):
          send(chunk({"content": value.text[len(sent):]}))
        send(chunk({}, value.finish_reason, usage=_usage(job, value), batch_size=value.batch_size))
      send("[DONE]")
      return

  def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
    data = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
      self.send_header(key, value)
    self.end_headers()
    self.wfile.write(data)

  def _error(self, e: RequestError) -> None:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    self._json(e.status, {"error": {"message": str(e), "type": e.kind, "code": e.status}}, headers)


def _head(job: Job, kind: str) -> dict:
  return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": job.model}


def _usage(job: Job, result: Result) -> dict:
  return {"prompt_tokens": len(job.ids), "completion_tokens": result.completion_tokens,
          "total_tokens": len(job.ids) + result.completion_tokens}
