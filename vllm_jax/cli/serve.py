"""`vllm-jax serve`: OpenAI's chat and completions API over HTTP, requests batched continuously."""

import argparse
import os
import sys

from vllm_jax import paths
from vllm_jax.cli import flags

DESCRIPTION = (
    "Serve a model over HTTP with OpenAI's API: POST /v1/chat/completions (a user turn may hold one image_url or "
    "video_url part, or several image_url parts: a clip's frames) and POST /v1/completions, with n, max_tokens, "
    "temperature, top_p, top_k, seed, stop, "
    "logprobs and stream (stream_options.include_usage); GET /v1/models, GET /health and GET /metrics "
    "(Prometheus). Requests are answered by --slots decode slots over one KV cache: a finished answer frees its "
    "slot at once for the next request, long prompts are prefilled a chunk at a time between decode steps, and "
    "prompts that begin alike (many questions about one video) reuse the cached part. Media come as base64 data: "
    "URLs; local files only with --media-root (files under that folder), http(s) URLs only with --allow-http. "
    "The sampling flags are the defaults of requests that leave them out. The URL is printed once the model is "
    "loaded; Ctrl-C stops the server.")


def add_parser(commands) -> None:
  serve = commands.add_parser("serve", help="serve a model with OpenAI's HTTP API, batching requests continuously",
                              description=DESCRIPTION)
  serve.add_argument("--model", required=True, help="a model folder written by `vllm-jax convert` or training")
  serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
  serve.add_argument("--port", type=flags.number(int, 0, 65535), default=8000, help="0 picks a free port")
  engine = serve.add_argument_group("batching")
  engine.add_argument("--slots", type=flags.number(int, 1), default=8,
                      help="requests decoded together (rows of the KV cache)")
  engine.add_argument("--max-len", type=flags.number(int, 64), default=None,
                      help="cache slots per row: a prompt and its max_tokens must fit (default: the model's context)")
  engine.add_argument("--prefill-chunk", type=flags.number(int, 32), default=512,
                      help="prompt tokens prefilled between two decode calls (a long video prompt takes several)")
  engine.add_argument("--decode-steps", type=flags.number(int, 1), default=8,
                      help="tokens decoded per device call (new requests join between calls)")
  engine.add_argument("--precompile", action="store_true",
                      help="compile every prefill and decode shape before serving (slot engine), so that no "
                           "request waits for a compile; takes a while, more with a long --max-len")
  engine.add_argument("--queue-size", type=flags.number(int, 1), default=256,
                      help="requests that may wait for a slot; more are refused with 503")
  engine.add_argument("--prefix-cache-mb", type=flags.number(float, 0), default=256,
                      help="memory for the KV caches of recent prompts, reused by prompts that begin alike")
  engine.add_argument("--media-cache-mb", type=flags.number(float, 0), default=1024,
                      help="memory for decoded and encoded media, by content (one video asked about many times is "
                           "encoded once)")
  engine.add_argument("--engine", choices=["slots", "static"], default="slots",
                      help="static: the earlier batching (a batch runs to its longest answer), for comparison")
  engine.add_argument("--batch-wait-ms", type=flags.number(float, 0), default=20,
                      help="--engine static: how long a request waits for others to share its batch")
  media = serve.add_argument_group("media in requests")
  media.add_argument("--media-root", type=local_folder, default=None,
                     help="serve local files named in requests (paths or file:// URLs), only those under this folder "
                          "(symlinks resolved); without it local paths are refused")
  media.add_argument("--allow-http", action="store_true",
                     help="fetch http(s) media URLs (the server then fetches any address it can reach for callers)")
  media.add_argument("--max-media-mb", type=flags.number(float, 0, low_open=True), default=64,
                     help="largest media file, data: URL or download")
  media.add_argument("--media-timeout-s", type=flags.number(float, 0, low_open=True), default=10,
                     help="time limit of an http(s) media download")
  serve.add_argument("--max-body-mb", type=flags.number(float, 0, low_open=True), default=64,
                     help="largest request body (data: URLs included); larger: 413")
  serve.add_argument("--cors-origin", action="append", default=[],
                     help="a web origin allowed to call the API from a browser (repeatable; * for any)")
  flags.media_flags(serve)
  flags.sampling_flags(serve)
  serve.set_defaults(run=run)


def local_folder(path: str) -> str:
  """An argparse type: a folder on this machine (the decoders open the files in it), made absolute."""
  if paths.is_url(path) or not os.path.isdir(paths.resolve(path)):
    raise argparse.ArgumentTypeError(f"no such folder on this machine: {path}")
  return paths.resolve(path)


def run(args) -> int:
  from vllm_jax import serve

  if args.precompile and args.engine != "slots":
    return flags.error("--precompile compiles the slot engine's shapes: drop it or use --engine slots")
  try:  # listen first: a busy port fails before the model loads
    server = serve.Server(None, args.host, args.port, engine=args.engine, slots=args.slots, max_len=args.max_len,
                          steps=args.decode_steps, prefill_chunk=args.prefill_chunk, queue_size=args.queue_size,
                          prefix_cache_mb=args.prefix_cache_mb, batch_wait_ms=args.batch_wait_ms,
                          max_body_mb=args.max_body_mb, cors_origins=tuple(args.cors_origin),
                          precompile=args.precompile)
  except OSError as e:
    return flags.error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
  try:
    model = load_model(args)
    if isinstance(model, int):
      return model
    server.set_model(model)
    print(f"serving {model.name} at {server.url}/v1 (POST /v1/chat/completions); Ctrl-C stops", flush=True)
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      pass
    print("stopped", file=sys.stderr)
    return 0
  finally:
    server.close()


def load_model(args):
  """The model folder as a serve.Model, or an exit status after an error line."""
  from vllm_jax import pretrained, serve
  defaults = serve.Defaults(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
  policy = serve.MediaPolicy(args.media_root, args.allow_http, args.max_media_mb, args.media_timeout_s)
  options = dict(defaults=defaults, media_policy=policy, media_cache_mb=args.media_cache_mb)
  name = paths.name(args.model)
  if pretrained.model_type(args.model) == "llama":
    if args.audio:
      return flags.error(f"--audio: {args.model} is a text-only LLaMA")
    config, params, tokenizer = pretrained.load_llama(args.model, mesh=flags.mesh(args.mesh), dtype=args.dtype)
    if tokenizer is None:
      return flags.error(f"{args.model} holds no tokenizer (tokenizer.json or tokenizer.model): copy the model's "
                         "tokenizer files into it")
    return serve.Model(name, tokenizer, config, params, **options)
  system = flags.load_system(args)
  use_audio = flags.use_audio(args, system)
  if use_audio is None:
    return flags.error(f"--audio: {args.model} has no audio branch")
  return serve.Model.from_system(name, system, use_audio, args.num_frames, **options)
