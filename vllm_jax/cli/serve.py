"""`vllm-jax serve`: an OpenAI-compatible HTTP server (chat completions), requests batched."""

import sys

from vllm_jax import paths
from vllm_jax.cli import flags

DESCRIPTION = ("Serve a model over HTTP with the OpenAI chat API: POST /v1/chat/completions (messages whose user "
               "turns may hold one image_url or video_url part: a local path, a file:// URL or a base64 data: URL; "
               "max_tokens, temperature, top_p, seed, stop, stream), GET /v1/models, GET /health, GET /metrics "
               "(batches and their sizes). Requests wait in a queue (full: 503) and are answered together, up to "
               "--max-batch at a time; each answer carries the \"batch_size\" it was answered in. Prompts without "
               "media are answered from their text (a plain LLaMA takes only those). The sampling flags are the "
               "defaults of requests that leave them out. The URL is printed when the model is loaded; Ctrl-C "
               "stops the server.")


def add_parser(commands) -> None:
  serve = commands.add_parser("serve", help="serve a model with an OpenAI-compatible HTTP API, batching requests",
                              description=DESCRIPTION)
  serve.add_argument("--model", required=True, help="a model folder written by `vllm-jax convert` or training")
  serve.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: requests may name local files)")
  serve.add_argument("--port", type=flags.number(int, 0, 65535), default=8000, help="0 picks a free port")
  serve.add_argument("--max-batch", type=flags.number(int, 1), default=4,
                     help="requests answered together (every batch runs this many rows: one compiled shape)")
  serve.add_argument("--batch-wait-ms", type=flags.number(float, 0), default=20,
                     help="how long a request waits for others to share its batch")
  serve.add_argument("--queue-size", type=flags.number(int, 1), default=32,
                     help="requests that may wait; more are refused with 503")
  serve.add_argument("--max-body-mb", type=flags.number(float, 0, low_open=True), default=64,
                     help="largest request body (data: URLs included); larger: 413")
  flags.media_flags(serve)
  flags.sampling_flags(serve)
  serve.set_defaults(run=run)


def run(args) -> int:
  from vllm_jax import serve

  try:
    server = serve.Server(None, args.host, args.port, args.max_batch, args.batch_wait_ms, args.queue_size,
                          args.max_body_mb)  # listen first: a busy port fails before the model loads
  except OSError as e:
    return flags.error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
  try:
    model = load_model(args)
    if isinstance(model, int):
      return model
    server.model = model
    print(f"serving {model.name} at {server.url}/v1 (POST /v1/chat/completions); Ctrl-C stops", flush=True)
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      print("stopped", file=sys.stderr)
    return 0
  finally:
    server.close()


def load_model(args):
  """The model folder as a serve.Model, or an exit status after an error line."""
  from vllm_jax import pretrained, serve
  defaults = serve.Defaults(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
  name = paths.name(args.model)
  if pretrained.model_type(args.model) == "llama":
    if args.audio:
      return flags.error(f"--audio: {args.model} is a text-only LLaMA")
    config, params, tokenizer = pretrained.load_llama(args.model, mesh=flags.mesh(args.mesh), dtype=args.dtype)
    if tokenizer is None:
      return flags.error(f"{args.model} holds no tokenizer (tokenizer.json or tokenizer.model): copy the model's "
                         "tokenizer files into it")
    return serve.Model(name, tokenizer, config, params, defaults=defaults)
  system = flags.load_system(args)
  use_audio = flags.use_audio(args, system)
  if use_audio is None:
    return flags.error(f"--audio: {args.model} has no audio branch")
  return serve.Model.from_system(name, system, use_audio, args.num_frames, defaults)
