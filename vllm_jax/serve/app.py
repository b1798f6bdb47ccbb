"""The HTTP side: OpenAI's chat and completions API on FastAPI/uvicorn, over an engine.

  POST /v1/chat/completions, POST /v1/completions   (n, logprobs, stop, seed, stream with
                                                      stream_options.include_usage)
  GET /v1/models, GET /health, GET /metrics (Prometheus)

A request is checked by its pydantic schema, turned into a prompt on a worker thread (media fetched
under the media policy, decoded, tokenized), and its `n` choices are submitted to the engine; the
engine's updates come back to the event loop, which answers or streams them. A client that leaves
cancels its rows. Errors are OpenAI's error objects: 400 for a bad request, 404 `model_not_found`,
413 for a large body, 503 with Retry-After when the queue is full.
"""

import asyncio
import json
import socket
import threading
import time
import uuid
from typing import Annotated, Literal, Union

import prometheus_client as prom
import uvicorn
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest

from vllm_jax.serve import engine as engine_lib
from vllm_jax.serve.model import Model, Prompt, RequestError

SEED_RANGE = (-2**63, 2**63 - 1)  # OpenAI's seeds are 64-bit integers


class _Schema(BaseModel):
  model_config = ConfigDict(extra="ignore")  # fields other clients send (user, metadata, ...) change nothing


class MediaRef(_Schema):
  url: str


class TextPart(_Schema):
  type: Literal["text"]
  text: str


class ImagePart(_Schema):
  type: Literal["image_url"]
  image_url: MediaRef | str


class VideoPart(_Schema):
  type: Literal["video_url"]
  video_url: MediaRef | str


class Message(_Schema):
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]] | None = None


class StreamOptions(_Schema):
  include_usage: bool = False


class _Sampling(_Schema):
  model: str | None = None
  max_tokens: int | None = Field(None, ge=1)
  temperature: float | None = Field(None, ge=0, le=2)
  top_p: float | None = Field(None, gt=0, le=1)
  top_k: int | None = Field(None, ge=0)
  n: int = Field(1, ge=1, le=16)
  seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
  stop: str | list[Annotated[str, Field(min_length=1)]] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  # Accepted at the value that changes nothing; anything else is refused rather than ignored.
  presence_penalty: Literal[0] = 0
  frequency_penalty: Literal[0] = 0
  logit_bias: dict[str, Literal[0]] | None = None

  def options(self) -> dict:
    stop = [self.stop] if isinstance(self.stop, str) else self.stop
    return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                seed=self.seed, stop=stop)


class ChatRequest(_Sampling):
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=engine_lib.TOP_LOGPROBS)
  tools: None = None
  response_format: dict | None = None

  def options(self) -> dict:
    options = super().options()
    if self.max_completion_tokens is not None:
      options["max_tokens"] = self.max_completion_tokens
    return options


class CompletionRequest(_Sampling):
  prompt: str | list[str] = Field(min_length=1)
  logprobs: int | None = Field(None, ge=0, le=5)
  echo: Literal[False] = False
  suffix: None = None


def _validation_message(e: ValidationError | RequestValidationError) -> str:
  parts = []
  for error in e.errors()[:3]:
    where = ".".join(str(x) for x in error["loc"] if x not in ("body",))
    parts.append(f"{where}: {error['msg']}" if where else error["msg"])
  return "; ".join(parts)


class Metrics:
  """The server's Prometheus metrics (its own registry: several servers may run in one process)."""

  def __init__(self, server: "Server"):
    self.registry = registry = prom.CollectorRegistry()
    self.requests = prom.Counter("vllm_jax_requests", "HTTP requests answered, by endpoint and status",
                                 ["endpoint", "status"], registry=registry)
    self.prompt_tokens = prom.Counter("vllm_jax_prompt_tokens", "prompt tokens submitted", registry=registry)
    self.generated = prom.Counter("vllm_jax_generation_tokens", "tokens generated", registry=registry)
    self.ttft = prom.Histogram("vllm_jax_time_to_first_token_seconds", "from arrival to the first token",
                               buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=registry)
    self.per_token = prom.Histogram("vllm_jax_time_per_output_token_seconds", "after the first token",
                                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=registry)
    self.latency = prom.Histogram("vllm_jax_request_latency_seconds", "from arrival to the last token",
                                  buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=registry)
    gauges = {"waiting": "requests waiting for a slot", "prefilling": "requests being prefilled",
              "busy_slots": "decode slots in use", "slots": "decode slots"}
    for name, doc in gauges.items():
      gauge = prom.Gauge(f"vllm_jax_{name}", doc, registry=registry)
      gauge.set_function(lambda name=name: server.load()[name])
    prom.Gauge("vllm_jax_prefix_reused_tokens_total", "prompt tokens found in the prefix cache", registry=registry
               ).set_function(lambda: server.engine.stats["reused_tokens"] if server.engine else 0)
    for name in ("hits", "misses"):
      prom.Gauge(f"vllm_jax_media_cache_{name}_total", f"encoded-media cache {name}", registry=registry
                 ).set_function(lambda name=name: server.model.media_cache.counts[name] if server.model else 0)
    prom.Gauge("vllm_jax_media_cache_bytes", "bytes held by the encoded-media cache", registry=registry
               ).set_function(lambda: server.model.media_cache.nbytes if server.model else 0)


class Choice:
  """One choice of a request: its engine row's updates, gathered."""

  def __init__(self, prompt: Prompt, index: int):
    self.prompt, self.index = prompt, index
    self.tokens, self.logprobs, self.top = [], [], []
    self.finish_reason, self.error, self.shown = None, None, ""
    self.first_token_at = None

  def add(self, update: engine_lib.Update) -> None:
    if update.tokens and self.first_token_at is None:
      self.first_token_at = time.monotonic()
    self.tokens += update.tokens
    self.logprobs += update.logprobs
    self.top += update.top_logprobs
    self.finish_reason, self.error = update.finish_reason, update.error


class Server:
  """The HTTP server around a `Model` and an engine (both may be set after the server is made: it
  listens at once, so that a busy port fails before a model loads). `start` serves from a thread,
  `serve_forever` from this one."""

  def __init__(self, model: Model | None, host: str = "127.0.0.1", port: int = 8000, *, engine: str = "slots",
               slots: int = 8, max_len: int | None = None, steps: int = 8, prefill_chunk: int = 512,
               queue_size: int = 256, prefix_cache_mb: float = 256, batch_wait_ms: float = 20,
               max_body_mb: float = 64, cors_origins: tuple[str, ...] = (), precompile: bool = False):
    if precompile and engine != "slots":
      raise ValueError("precompile needs the slot engine")
    self.precompile = precompile
    self.engine_kind, self.engine_options = engine, dict(slots=slots, max_len=max_len, max_waiting=queue_size)
    if engine == "slots":
      self.engine_options.update(steps=steps, prefill_chunk=prefill_chunk, prefix_cache_mb=prefix_cache_mb)
    else:
      self.engine_options.update(batch_wait_ms=batch_wait_ms)
    self.max_body = max_body_mb * 2**20
    self.model, self.engine = None, None
    self.created = int(time.time())
    self.metrics = Metrics(self)
    self.socket = socket.create_server((host, port), backlog=2048)  # binds now: a busy port fails here
    self.address = self.socket.getsockname()[:2]
    self.app = self._app(cors_origins)
    # log_config None: uvicorn leaves the process's logging as it is (its own would be global).
    self.http = uvicorn.Server(uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False,
                                              timeout_graceful_shutdown=2))
    self.thread = None
    if model is not None:
      self.set_model(model)

  def load(self) -> dict[str, int]:
    return self.engine.load() if self.engine is not None else dict(waiting=0, prefilling=0, busy_slots=0, slots=0)

  def set_model(self, model: Model) -> None:
    from vllm_jax.serve.static import StaticEngine
    kind = engine_lib.Engine if self.engine_kind == "slots" else StaticEngine
    engine = kind(model.llama, model.llm_params, model.stop_ids, **self.engine_options)
    if self.precompile:
      engine.precompile()
    self.engine = engine.start()
    self.model = model

  @property
  def url(self) -> str:
    return "http://{}:{}".format(*self.address)

  def serve_forever(self) -> None:
    self.http.run(sockets=[self.socket])

  def start(self) -> "Server":
    self.thread = threading.Thread(target=self.serve_forever, name="vllm-jax-http", daemon=True)
    self.thread.start()
    while not self.http.started and self.thread.is_alive():
      time.sleep(0.01)
    return self

  def close(self) -> None:
    """Stop serving; requests still waiting or running end (streams with an error, others 503)."""
    self.http.should_exit = True
    if self.thread is not None:
      self.thread.join()
    if self.engine is not None:
      self.engine.stop()
    self.socket.close()

  # --- the app ------------------------------------------------------------------------------

  def _app(self, cors_origins) -> FastAPI:
    app = FastAPI(title="vllm-jax", docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
      app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                         allow_headers=["*"])

    @app.exception_handler(RequestError)
    async def request_error(request: HTTPRequest, e: RequestError):
      return self._error(request, e)

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, e: HTTPException):
      message = (f"no such path: {request.url.path} (try POST /v1/chat/completions)" if e.status_code == 404 else
                 f"{request.url.path} does not take {request.method}" if e.status_code == 405 else str(e.detail))
      return self._error(request, RequestError(message, e.status_code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: HTTPRequest, e: RequestValidationError):
      return self._error(request, RequestError(_validation_message(e)))

    @app.get("/health")
    async def health():
      if self.model is None:
        return JSONResponse({"status": "loading"}, 503)
      return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
      data = [{"id": self.model.name, "object": "model", "created": self.created, "owned_by": "vllm_jax"}]
      return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
      return Response(prom.generate_latest(self.metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
      body = self._parse(ChatRequest, await self._body(request))
      prompt = await run_in_threadpool(self.model.chat_prompt, [m.model_dump() for m in body.messages],
                                       body.options())
      top = (body.top_logprobs or 0) if body.logprobs else None
      return await self._answer(request, body, prompt, top, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
      body = self._parse(CompletionRequest, await self._body(request))
      texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
      if len(texts) != 1:
        raise RequestError("one prompt per request (send the others as their own requests)")
      prompt = await run_in_threadpool(self.model.completion_prompt, texts[0], body.options())
      return await self._answer(request, body, prompt, body.logprobs, chat=False)

    return app

  def _error(self, request: HTTPRequest, e: RequestError) -> JSONResponse:
    self.metrics.requests.labels(request.url.path, str(e.status)).inc()
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse({"error": {"message": str(e), "type": e.kind, "param": None, "code": e.code or e.status}},
                        e.status, headers)

  async def _body(self, request: HTTPRequest):
    if self.model is None:
      raise RequestError("the model is still loading", 503, "server_error")
    try:
      length = int(request.headers.get("content-length") or 0)
    except ValueError:
      raise RequestError("bad Content-Length header") from None
    if length > self.max_body:
      raise RequestError(f"the body is over {self.max_body / 2**20:g} MB (--max-body-mb)", 413)
    data = await request.body()
    if len(data) > self.max_body:
      raise RequestError(f"the body is over {self.max_body / 2**20:g} MB (--max-body-mb)", 413)
    try:
      return json.loads(data)
    except ValueError as e:  # bad JSON or bad UTF-8
      raise RequestError(f"the body is not valid JSON: {e}") from None

  def _parse(self, schema, body):
    try:
      parsed = schema.model_validate(body)
    except ValidationError as e:
      raise RequestError(_validation_message(e)) from None
    if parsed.model is not None and parsed.model != self.model.name:
      raise RequestError(f"the model `{parsed.model}` does not exist: this server serves `{self.model.name}`", 404,
                         code="model_not_found")
    if isinstance(parsed, ChatRequest) and (parsed.response_format or {}).get("type", "text") != "text":
      raise RequestError('"response_format": only text answers are supported')
    return parsed

  async def _answer(self, request: HTTPRequest, body, prompt: Prompt, top: int | None, chat: bool):
    """Submit the request's choices; answer them whole, or stream them."""
    if not self.engine.fits(len(prompt.ids), prompt.max_tokens):
      raise RequestError(f"the prompt takes {len(prompt.ids)} tokens; with max_tokens {prompt.max_tokens} it does not "
                         "fit a row of the server's cache (--max-len)")
    if top is not None and self.engine_kind != "slots":
      raise RequestError("logprobs need the slot engine (--engine slots)")
    loop, updates = asyncio.get_running_loop(), asyncio.Queue()
    arrived = time.monotonic()
    choices = [Choice(prompt, i) for i in range(body.n)]
    rows = []
    for i in range(body.n):
      notify = lambda update, i=i: loop.call_soon_threadsafe(updates.put_nowait, (i, update))
      stop_check = (lambda tokens: self.model.stops(prompt, tokens)) if prompt.stop else None
      rows.append(engine_lib.Request(prompt.ids, prompt.max_tokens, prompt.sampling, (prompt.seed + i) % 2**64,
                                     prompt.embeds, stop_check, notify, logprobs=top is not None))
    try:
      for row in rows:
        self.engine.submit(row)
    except engine_lib.Busy as e:
      for row in rows:
        self.engine.cancel(row)
      raise RequestError(f"the server is busy ({e}); retry later", 503, "server_error", "server_overloaded") from None
    self.metrics.prompt_tokens.inc(len(prompt.ids) * body.n)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": self.model.name}
    stream = self._stream(request, rows, choices, updates, head, top, chat, body, arrived)
    if body.stream:
      return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async for _ in stream:  # a whole answer: the stream's events, unsent
      pass
    if any(c.finish_reason is None for c in choices):  # the client left before the answer
      self.metrics.requests.labels(request.url.path, "499").inc()
      return Response(status_code=499)
    failed = next((c.error for c in choices if c.error is not None), None)
    if failed is not None:
      raise RequestError(f"generation failed: {type(failed).__name__}: {failed}", 500, "server_error")
    if any(c.finish_reason == "cancelled" for c in choices):
      raise RequestError("the server is shutting down", 503, "server_error")
    texts = [self.model.finish(prompt, c.tokens) for c in choices]
    answer = []
    for c, (text, reason, used) in zip(choices, texts):
      logprobs = self._logprobs(c, used, top, chat) if top is not None else None
      content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
      answer.append({"index": c.index, **content, "finish_reason": reason, "logprobs": logprobs})
    self.metrics.requests.labels(request.url.path, "200").inc()
    usage = self._usage(prompt, [used for _, _, used in texts])
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": answer, "usage": usage}

  async def _stream(self, request, rows, choices, updates, head, top, chat, body, arrived):
    """Server-sent events as the text grows: OpenAI's chunks, a usage chunk when asked for, [DONE].
    Also how a whole answer is gathered (its events then go nowhere). Leaving cancels the rows."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    usage_chunk = body.stream and body.stream_options is not None and body.stream_options.include_usage

    def event(data) -> str:
      return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

    def chunk(c: Choice, text: str, reason=None, logprobs=None) -> str:
      piece = ({"delta": {"content": text} if text or reason is None else {}} if chat else {"text": text})
      data = {**head, "object": kind, "choices": [{"index": c.index, **piece, "finish_reason": reason,
                                                    "logprobs": logprobs}]}
      return event({**data, "usage": None} if usage_chunk else data)

    left = set(range(len(choices)))
    disconnect = asyncio.ensure_future(_disconnected(request)) if not body.stream else None
    try:
      if chat and body.stream:
        for c in choices:
          data = {**head, "object": kind, "choices": [{"index": c.index, "delta": {"role": "assistant",
                                                                                     "content": ""},
                                                        "finish_reason": None, "logprobs": None}]}
          yield event({**data, "usage": None} if usage_chunk else data)
      while left:
        waiting = asyncio.ensure_future(updates.get())
        done, _ = await asyncio.wait({waiting, disconnect} - {None}, return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
          waiting.cancel()
          return  # the client left (the finally cancels its rows)
        i, update = waiting.result()
        c = choices[i]
        c.add(update)
        if update.finish_reason is None:
          if body.stream:
            text = self.model.visible(c.prompt, c.tokens)
            if len(text) > len(c.shown) and text.startswith(c.shown):
              yield chunk(c, text[len(c.shown):])
              c.shown = text
          continue
        left.discard(i)
        self._observe(c, arrived)
        if not body.stream:
          continue
        if update.error is not None or update.finish_reason == "cancelled":
          message = (f"generation failed: {type(update.error).__name__}: {update.error}" if update.error is not None
                     else "the server is shutting down")
          yield event({"error": {"message": message, "type": "server_error", "code": 500}})
          return
        text, reason, used = self.model.finish(c.prompt, c.tokens)
        if text.startswith(c.shown) and len(text) > len(c.shown):
          yield chunk(c, text[len(c.shown):])
        yield chunk(c, "", reason, self._logprobs(c, used, top, chat) if top is not None else None)
      if body.stream:
        self.metrics.requests.labels(request.url.path, "200").inc()
        if usage_chunk:
          used = [self.model.finish(c.prompt, c.tokens)[2] for c in choices]
          yield event({**head, "object": kind, "choices": [], "usage": self._usage(choices[0].prompt, used)})
        yield event("[DONE]")
    finally:
      if disconnect is not None:
        disconnect.cancel()
      for row in rows:
        self.engine.cancel(row)

  def _observe(self, c: Choice, arrived: float) -> None:
    now = time.monotonic()
    self.metrics.generated.inc(len(c.tokens))
    self.metrics.latency.observe(now - arrived)
    if c.first_token_at is not None:
      self.metrics.ttft.observe(c.first_token_at - arrived)
      if len(c.tokens) > 1:
        self.metrics.per_token.observe((now - c.first_token_at) / (len(c.tokens) - 1))

  def _logprobs(self, c: Choice, used: int, top: int, chat: bool) -> dict:
    """The answer's tokens with their log-probabilities, as OpenAI's chat or completions API lays them out."""
    text = self.model.token_text
    if chat:
      entry = lambda t, lp: {"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
      return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alternatives[:top]]}
                          for t, lp, alternatives in zip(c.tokens[:used], c.logprobs, c.top)]}
    tokens = [text(t) for t in c.tokens[:used]]
    offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": c.logprobs[:used], "text_offset": offsets,
            "top_logprobs": [{text(a): alp for a, alp in alternatives[:top]} for alternatives in c.top[:used]]}

  @staticmethod
  def _usage(prompt: Prompt, used: list[int]) -> dict:
    prompt_tokens = len(prompt.ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": sum(used), "total_tokens": prompt_tokens + sum(used)}


async def _disconnected(request: HTTPRequest) -> None:
  """Returns when the client closes the connection (the body has been read: nothing else comes)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass
