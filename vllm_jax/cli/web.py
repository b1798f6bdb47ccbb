"""`vllm-jax web`: a chat page in the browser about an uploaded video or image (gradio)."""

from vllm_jax.cli import flags

DESCRIPTION = ("Serve a chat page: upload a video or an image, see the frames the model reads with their times, "
               "and talk about it in a streamed multi-turn chat (the media are encoded once per upload and the KV "
               "cache is kept between turns). The flags set the page's starting values. Needs the web extra: "
               "pip install -e '.[web]'.")


def add_parser(commands) -> None:
  web = commands.add_parser("web", help="a chat page in the browser (gradio)", description=DESCRIPTION)
  web.add_argument("--model", required=True, help="a model folder written by `vllm-jax convert` or training")
  web.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0: every interface)")
  web.add_argument("--port", type=flags.number(int, 1, 65535), default=7860)
  web.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
  flags.media_flags(web)
  flags.sampling_flags(web)
  web.set_defaults(run=run)


def run(args) -> int:
  try:  # before the model loads (minutes at 7B)
    from vllm_jax import web
  except ImportError as e:
    if e.name != "gradio":
      raise
    return flags.error("the web page needs gradio: pip install -e '.[web]'")
  from vllm_jax import pretrained
  try:
    kind = pretrained.model_type(args.model)
  except FileNotFoundError as e:
    return flags.error(str(e))
  if kind == "llama":
    return flags.error(f"{args.model} is a text-only LLaMA; the web page needs a video model")
  system = flags.load_system(args)
  context = system.config.llama.max_position_embeddings
  if args.max_new_tokens >= context:
    return flags.error(f"--max-new-tokens {args.max_new_tokens}: the model's context is {context} tokens")
  use_audio = flags.use_audio(args, system)
  if use_audio is None:
    return flags.error(f"--audio: {args.model} has no audio branch")
  app = web.build_app(system, use_audio=use_audio, num_frames=args.num_frames, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                      title=f"vllm_jax: {kind} from {args.model}")
  app.queue().launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False)
  return 0
