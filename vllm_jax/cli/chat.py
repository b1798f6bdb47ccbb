"""`vllm-jax chat`: answer one question, or a multi-turn conversation, about a video or an image
(any system), or a text prompt (a plain LLaMA)."""

import copy
import sys

from vllm_jax.cli import flags

BUCKET = 16  # prompt tails are padded to a multiple of this, so that few shapes compile
TEXT_ROOM = 4096  # the chat's cache holds the media tokens and this much text (within the context)

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
  chat.add_argument("--video", default=None, help="a video file to talk about (video models)")
  chat.add_argument("--image", default=None, help="an image file (jpg/png/webp/gif) to talk about")
  flags.media_flags(chat)
  flags.sampling_flags(chat)
  chat.set_defaults(run=run)


def run(args) -> int:
  import os

  from vllm_jax import pretrained
  media = args.video or args.image
  if media and not os.path.isfile(media):  # before the model loads (minutes at 7B)
    return flags.error(f"media file not found: {media}")
  try:
    kind = pretrained.model_type(args.model)
  except FileNotFoundError as e:
    return flags.error(str(e))
  if kind == "llama":
    if args.video or args.image:
      return flags.error(f"{args.model} is a text-only LLaMA; --video/--image need a video model")
    return _chat_text(args)
  return _chat_media(args)


def _describe(media) -> str:
  """'image', or the video's frame times (their range when there are many)."""
  times = media.frames.timestamps
  if media.is_image:
    return "image"
  if len(times) > 16:
    return f"video, {len(times)} frames from {times[0]} to {times[-1]} s"
  return f"video, frames at {', '.join(str(t) for t in times)} s"


def _streamer(tokenizer, stop_ids, stop_strings=()):
  """An `on_tokens` callback printing the answer as it grows (held back where a stop string may start)."""
  from vllm_jax.data.conversation import visible_prefix
  state = {"shown": "", "tokens": []}

  def stream(tokens):
    state["tokens"].extend(int(t) for t in tokens[0] if t not in stop_ids)
    text = visible_prefix(tokenizer.decode(state["tokens"], skip_special_tokens=True), stop_strings)
    print(text[len(state["shown"]):], end="", flush=True)
    state["shown"] = text

  return stream, state


def _chat_text(args) -> int:
  from vllm_jax import generate, pretrained
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
    stream, _ = _streamer(tokenizer, stop_ids)
    generate.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                      sampling=flags.sampling(args), stop_token_ids=stop_ids, tokenizer=tokenizer, seed=seed,
                      on_tokens=stream)
    print()

  return _ask(answer, args, "Type a prompt and press enter")


def _chat_media(args) -> int:
  from vllm_jax import generate
  system = flags.load_system(args)
  llama = system.config.llama
  context = llama.max_position_embeddings
  if args.max_new_tokens >= context:
    return flags.error(f"--max-new-tokens {args.max_new_tokens}: the model's context is {context} tokens")
  path = args.video or args.image
  if path is None:
    return flags.error(f"{args.model} is a video model; give --video or --image")
  use_audio = flags.use_audio(args, system)
  if use_audio is None:
    return flags.error(f"--audio: {args.model} has no audio branch")
  media = system.load_media(path, use_audio=use_audio, num_frames=args.num_frames)  # bad media: main's error line
  with_audio = use_audio and media.audio_valid
  if use_audio and not media.is_image and not media.audio_valid:
    print(f"note: {path} has no usable audio track; answering from the frames only", file=sys.stderr)
  print(f"[{_describe(media)}{', with audio' if with_audio else ''}]", file=sys.stderr)

  conv = system.conversation(media, with_audio)
  tokens = system.encode_media([media], use_audio=with_audio)
  # A long video's tokens set the cache size (an hour at 2 tokens per frame: 7,200), not the
  # context (65,536 for long-video models), which may not fit in memory.
  media_tokens = sum(n for _, n in system.placeholders(media).values())
  room = f"the model's context of {context}"
  if media_tokens + TEXT_ROOM < context:
    context = media_tokens + TEXT_ROOM
    room = f"the chat's {context} tokens (the media's {media_tokens} and {TEXT_ROOM} for text)"
  # Slots to spare for the Session's left padding of each turn (positions stay within the context).
  session = generate.Session(llama, system.params["llm"], max_len=context + 2 * BUCKET, bucket=BUCKET)
  stop_strings = system.template.stop_strings

  def answer(question: str, seed: int) -> None:
    nonlocal conv
    if question == "/reset":
      conv = system.conversation(media, with_audio)
      print("(a new conversation about the same media)", file=sys.stderr)
      return
    before = copy.deepcopy(conv)
    conv.ask(question)
    dropped = 0
    while True:
      ids = system.prompt_ids(conv.prompt(), media)
      if len(ids) + args.max_new_tokens <= context:
        stream, shown = _streamer(system.tokenizer, system.stop_ids, stop_strings)
        try:
          out = session.generate(ids, system.embed([ids], tokens, [conv]), max_new_tokens=args.max_new_tokens,
                                 sampling=flags.sampling(args), stop_token_ids=system.stop_ids,
                                 stop_strings=stop_strings, tokenizer=system.tokenizer, seed=seed, on_tokens=stream)
          break
        except generate.ContextFullError:  # padding of earlier turns: start again after the media
          pass
      if not conv.drop_oldest_turn():
        conv = before
        raise TooLong(f"the media and this question take {len(ids)} tokens; with --max-new-tokens "
                      f"{args.max_new_tokens} they do not fit {room}")
      dropped += 1
    if dropped:
      print(f"(the {dropped} oldest turn(s) were dropped to fit {room})", file=sys.stderr)
    if out.texts[0].startswith(shown["shown"]):  # a held-back tail that turned out not to start a stop string
      print(out.texts[0][len(shown["shown"]):], end="")
    print()
    conv.answer(system.clean_answer(out.texts[0]))

  return _ask(answer, args, "Ask about the media and press enter (/reset starts over)")


def _ask(answer, args, hint: str) -> int:
  """One --question (a question that cannot fit: status 2), or the interactive loop (it is
  reported and the loop goes on)."""
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


class TooLong(ValueError):
  """A question that cannot fit the model's context even with every earlier turn dropped."""
