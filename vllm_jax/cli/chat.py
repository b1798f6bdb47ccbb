"""`vllm-jax chat`: answer one question, or a multi-turn conversation, about a video or an image
(any system), or a text prompt (a plain LLaMA)."""

import sys

from vllm_jax.cli import flags

DESCRIPTION = ("Answer one --question, or read prompts interactively from the terminal (a multi-turn "
               "conversation for video models: the media are encoded once and the KV cache is kept "
               "between turns). Tokens are printed as they are generated. A missing or corrupt media "
               "file is reported and the command exits with status 2; a video without audio is "
               "answered from its frames.")


def add_parser(commands) -> None:
  chat = commands.add_parser("chat", help="generate from a converted model, streaming tokens",
                             description=DESCRIPTION)
  chat.add_argument("--model", required=True, help="a model folder written by `vllm-jax convert` or training")
  chat.add_argument("--question", default=None, help="answer this prompt and exit")
  media = chat.add_mutually_exclusive_group()
  media.add_argument("--video", default=None, help="a video file to talk about (video models)")
  media.add_argument("--image", default=None, help="an image file (jpg/png/webp/gif) to talk about")
  flags.media_flags(chat)
  flags.sampling_flags(chat)
  chat.set_defaults(run=run)


def run(args) -> int:
  from vllm_jax import paths, pretrained
  from vllm_jax.data.video import IMAGE_EXTENSIONS, is_image_path
  media = args.video or args.image
  if media and not paths.is_file(media):  # before the model loads (minutes at 7B)
    return flags.error(f"media file not found: {media}")
  if media and is_image_path(media) != bool(args.image):  # the file's kind goes by its extension
    return flags.error(f"--image {media}: not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))})" if args.image
                       else f"--video {media} is an image: give it as --image")
  try:
    kind = pretrained.model_type(args.model)
  except FileNotFoundError as e:
    return flags.error(str(e))
  if kind == "llama":
    if args.video or args.image:
      return flags.error(f"{args.model} is a text-only LLaMA; --video/--image need a video model")
    return _chat_text(args)
  return _chat_media(args)


def _printer():
  """An `on_text` callback printing what each text adds to the one before."""
  shown = ""

  def show(text: str) -> None:
    nonlocal shown
    print(text[len(shown):], end="", flush=True)
    shown = text

  return show


def _chat_text(args) -> int:
  from vllm_jax import generate, pretrained
  from vllm_jax.chat_session import Streamer, TooLong
  from vllm_jax.data.tokenizer import left_pad
  config, params, tokenizer = pretrained.load_llama(args.model, mesh=flags.mesh(args.mesh), dtype=args.dtype)
  if tokenizer is None:
    return flags.error(f"{args.model} holds no tokenizer (tokenizer.json or tokenizer.model): copy the model's "
                       "tokenizer files into it")
  stop_ids = sorted({i for i in (tokenizer.eos_token_id, config.eos_token_id) if isinstance(i, int)})
  context = config.max_position_embeddings
  if args.max_new_tokens >= context:
    return flags.error(f"--max-new-tokens {args.max_new_tokens}: the model's context is {context} tokens")

  def answer(question: str, seed: int) -> None:
    prompt = tokenizer(question).input_ids
    if len(prompt) + args.max_new_tokens > context:
      raise TooLong(f"the prompt takes {len(prompt)} tokens; with --max-new-tokens {args.max_new_tokens} it does "
                    f"not fit the model's context of {context}")
    ids, mask = left_pad([prompt], multiple=32)
    generate.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                      sampling=flags.sampling(args), stop_token_ids=stop_ids, tokenizer=tokenizer, seed=seed,
                      on_tokens=Streamer(tokenizer, stop_ids, _printer()))
    print()

  return _ask(answer, args, "Type a prompt and press enter")


def _chat_media(args) -> int:
  from vllm_jax.chat_session import MediaChat
  system = flags.load_system(args)
  context = system.config.llama.max_position_embeddings
  if args.max_new_tokens >= context:
    return flags.error(f"--max-new-tokens {args.max_new_tokens}: the model's context is {context} tokens")
  path = args.video or args.image
  if path is None:
    return flags.error(f"{args.model} is a video model; give --video or --image")
  use_audio = flags.use_audio(args, system)
  if use_audio is None:
    return flags.error(f"--audio: {args.model} has no audio branch")
  media = system.load_media(path, use_audio=use_audio, num_frames=args.num_frames)  # bad media: main's error line
  chat = MediaChat(system, media, use_audio)
  if chat.audio_missing:
    print(f"note: {path} has no usable audio track; answering from the frames only", file=sys.stderr)
  print(f"[{chat.describe()}]", file=sys.stderr)

  def answer(question: str, seed: int) -> None:
    if question == "/reset":
      chat.reset()
      print("(a new conversation about the same media)", file=sys.stderr)
      return
    _, dropped = chat.ask(question, args.max_new_tokens, flags.sampling(args), seed, on_text=_printer())
    print()
    if dropped:
      print(f"(the {dropped} oldest turn(s) were dropped to fit {chat.room})", file=sys.stderr)

  return _ask(answer, args, "Ask about the media and press enter (/reset starts over)")


def _ask(answer, args, hint: str) -> int:
  """One --question (a question that cannot fit: status 2), or the interactive loop (it is
  reported and the loop goes on)."""
  from vllm_jax.chat_session import TooLong
  if args.question is not None:
    try:
      return flags.answer_or_loop(answer, args.question, args.seed, hint)
    except TooLong as e:
      return flags.error(str(e))

  def answer_or_report(question: str, seed: int) -> None:
    try:
      answer(question, seed)
    except TooLong as e:
      print(f"error: {e}; ask something shorter" + (", or /reset" if "/reset" in hint else ""), file=sys.stderr)

  return flags.answer_or_loop(answer_or_report, None, args.seed, hint)

