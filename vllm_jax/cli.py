"""The `vllm-jax` command."""

import argparse
import sys
import time

EPILOG = """examples:
  vllm-jax demo                      # train a tiny audio-visual Video-LLaMA on synthetic videos (~10 min, CPU)
  vllm-jax convert llama --hf-dir ./vicuna-7b --out ./models/vicuna-7b
  vllm-jax chat --model ./models/vicuna-7b --question "What is a llama?"
  vllm-jax convert video-llama --config 7b --llama-dir ./vicuna-7b --eva-vit eva_vit_g.pth \\
      --blip2 blip2_pretrained_flant5xxl.pth --vl finetune-vicuna7b-v2.pth \\
      --al finetune_vicuna7b_audiobranch.pth --imagebind imagebind_huge.pth --out ./models/video-llama-7b
  vllm-jax chat --model ./models/video-llama-7b --video clip.mp4 --question "What happens?"
  vllm-jax infer --model ./models/video-llama-7b --input questions.jsonl --output answers.jsonl
  vllm-jax train --config configs/video_llama.py:stage1 --config.init_from=./models/video-llama-7b \\
      --config.data.webvid_csv=webvid/results_2M_train.csv --config.data.webvid_dir=webvid/videos \\
      --config.train.workdir=./runs/stage1
"""

TRAIN_HELP = """Train Video-LLaMA with a config file: `--config FILE:ARG` calls FILE's get_config(ARG)
(e.g. configs/video_llama.py:stage1, :stage2, :stage2_full, :tiny_stage1), and each
`--config.a.b=VALUE` then sets field a.b, VALUE read as the field's type (ints, floats,
true/false, comma-separated or Python-literal tuples, strings as they are).

Starts from a converted model folder (--config.init_from=DIR, written by `vllm-jax convert
video-llama`) or from a random init of the config's model (with --config.data.tokenizer=DIR).
Data: WebVid-style CSV captions (data.webvid_csv, data.webvid_dir) and/or instruction JSON
(data.instruct_json, data.instruct_dir, data.instruct_format llava|videochat); unreadable videos
are skipped and counted. Logs a line every train.log_every steps; with train.workdir, writes
orbax checkpoints (workdir/checkpoints), TensorBoard events and metrics.jsonl there, and a rerun
resumes from the latest checkpoint (data position included). SIGTERM checkpoints and stops.
Mesh: mesh.data, mesh.fsdp, mesh.tensor (-1 = the remaining devices).
"""



def _answer_or_loop(answer, question: str | None, seed: int, hint: str) -> int:
  """`answer(question, seed)` once, or, without a question, for each line typed until an empty
  line or Ctrl-D (seed + turn for the turn-th)."""
  if question is not None:
    answer(question, seed)
    return 0
  print(f"{hint}; an empty line or Ctrl-D quits.", file=sys.stderr)
  for turn in range(sys.maxsize):
    try:
      line = input("> ").strip()
    except EOFError:
      break
    if not line:
      break
    answer(line, seed + turn)
  return 0

def _mesh(spec: str | None):
  if not spec:
    return None
  from vllm_jax.train.sharding import make_mesh
  return make_mesh(tuple(int(s) for s in spec.split(",")))


def cmd_convert_llama(args) -> int:
  import jax

  from vllm_jax import pretrained
  from vllm_jax.converters import llama
  start = time.perf_counter()
  config, params = llama.load_hf(args.hf_dir, param_dtype=args.dtype)
  pretrained.save_llama(args.out, config, params)
  copied = llama.copy_tokenizer(args.hf_dir, args.out)
  leaves = jax.tree.leaves(params)
  print(f"converted {sum(x.size for x in leaves) / 1e6:.1f}M parameters "
        f"({sum(x.nbytes for x in leaves) / 2**30:.2f} GiB, {config.param_dtype}) in "
        f"{time.perf_counter() - start:.1f}s -> {args.out}")
  if not copied:
    print("warning: no tokenizer files found next to the weights; `chat` needs them", file=sys.stderr)
  return 0


def cmd_convert_video_llama(args) -> int:
  import jax

  from vllm_jax import pretrained
  from vllm_jax.configs import video_llama as video_llama_configs
  from vllm_jax.converters import video_llama_full
  from vllm_jax.models.video_llama import VideoLlamaConfig
  start = time.perf_counter()
  cfg = video_llama_configs.get_config(args.config)
  files = {k: getattr(args, k) or cfg.checkpoints[k] or None for k in cfg.checkpoints}
  if not files["llama_dir"]:
    print("error: --llama-dir (or checkpoints.llama_dir in the config) is required", file=sys.stderr)
    return 2
  base = VideoLlamaConfig.from_dict(cfg.model.to_dict())
  if args.template:
    base = base.replace(template=args.template)
  config, params, tokenizer = video_llama_full.assemble(base, param_dtype=args.dtype, **files)
  pretrained.save_video_llama(args.out, config, params, tokenizer)
  leaves = jax.tree.leaves(params)
  parts = ", ".join(f"{k} {sum(x.size for x in jax.tree.leaves(v)) / 1e6:.1f}M" for k, v in params.items())
  print(f"converted {sum(x.size for x in leaves) / 1e6:.1f}M parameters ({parts}; "
        f"{'with' if config.audio else 'without'} audio) in {time.perf_counter() - start:.1f}s -> {args.out}")
  return 0


def cmd_chat(args) -> int:
  from vllm_jax import generate, pretrained
  if pretrained.model_type(args.model) == "video_llama":
    return _chat_video(args)
  if args.video or args.image:
    print(f"error: {args.model} is a text-only LLaMA; --video/--image need a video_llama model", file=sys.stderr)
    return 2
  from vllm_jax.data.tokenizer import left_pad
  config, params, tokenizer = pretrained.load_llama(args.model, mesh=_mesh(args.mesh), dtype=args.dtype)
  sampling = generate.SamplingConfig(args.temperature, args.top_k, args.top_p)
  stop_ids = sorted({i for i in (tokenizer.eos_token_id, config.eos_token_id) if isinstance(i, int)})

  def answer(question: str, seed: int) -> str:
    ids, mask = left_pad([tokenizer(question).input_ids], multiple=32)
    shown, generated = "", []

    def stream(tokens):
      nonlocal shown
      generated.extend(int(t) for t in tokens[0] if t not in stop_ids)
      text = tokenizer.decode(generated, skip_special_tokens=True)
      print(text[len(shown):], end="", flush=True)
      shown = text

    out = generate.generate(config, params, input_ids=ids, attention_mask=mask,
                            max_new_tokens=args.max_new_tokens, sampling=sampling,
                            stop_token_ids=stop_ids, tokenizer=tokenizer, seed=seed, on_tokens=stream)
    print()
    return out.texts[0]

  return _answer_or_loop(answer, args.question, args.seed, "Type a prompt and press enter")


def _stop_ids(config, tokenizer) -> list[int]:
  eos = config.eos_token_id if isinstance(config.eos_token_id, tuple) else (config.eos_token_id,)
  return sorted({i for i in (tokenizer.eos_token_id, *eos) if isinstance(i, int)})


def _media_inputs(config, media, use_audio: bool):
  """Media -> (frames [1, T, H, W, 3], frame mask [1, T], audio clips [1, N, ...] or None)."""
  with_audio = use_audio and media.audio_valid
  return (media.frames.frames[None], media.frames.frame_mask[None],
          media.audio[None] if with_audio else None)


def _clip_config(config):
  """The audio clips the model's audio branch reads (Video-LLaMA: 8 clips of 128 mel x 204 frames)."""
  from vllm_jax.data.audio import AudioClipConfig
  if config.audio is None:
    return AudioClipConfig()
  enc = config.audio.encoder
  return AudioClipConfig(num_clips=config.audio.max_clips, num_mel_bins=enc.num_mel_bins, num_frames=enc.num_frames)


def _use_audio(args, config) -> bool | None:
  """--audio/--no-audio, by default on when the model has an audio branch; None: impossible."""
  if args.audio and config.audio is None:
    return None
  return config.audio is not None if args.audio is None else args.audio


def _chat_video(args) -> int:
  import numpy as np

  from vllm_jax import generate, pretrained
  from vllm_jax.data import conversation as conv_lib
  from vllm_jax.data.media import MediaError, load_media
  config, params, tokenizer = pretrained.load_video_llama(args.model, mesh=_mesh(args.mesh), dtype=args.dtype)
  path = args.video or args.image
  if path is None:
    print(f"error: {args.model} is a video model; give --video or --image", file=sys.stderr)
    return 2
  use_audio = _use_audio(args, config)
  if use_audio is None:
    print(f"error: --audio: {args.model} has no audio branch", file=sys.stderr)
    return 2
  try:
    media = load_media(path, args.num_frames or config.num_frames, config.vision.vit.image_size,
                       with_audio=use_audio, audio_config=_clip_config(config))
  except (FileNotFoundError, MediaError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  with_audio = use_audio and media.audio_valid
  if use_audio and not media.is_image and not media.audio_valid:
    print(f"note: {path} has no usable audio track; answering from the frames only", file=sys.stderr)
  times = ", ".join(str(t) for t in media.frames.timestamps)
  print(f"[{'image' if media.is_image else f'video, frames at {times} s'}{', with audio' if with_audio else ''}]",
        file=sys.stderr)

  template = conv_lib.get_template(config.template)
  conv = conv_lib.Conversation.for_media(template, media.frames.timestamps, media.is_image, with_audio)
  video, audio = generate.encode_media(config, params, *_media_inputs(config, media, use_audio))
  session = generate.Session(config.llama, params["llm"], max_len=config.llama.max_position_embeddings)
  sampling = generate.SamplingConfig(args.temperature, args.top_k, args.top_p)
  stop_ids = _stop_ids(config.llama, tokenizer)

  def answer(question: str, seed: int) -> None:
    conv.ask(question)
    ids = conv_lib.encode_prompt(tokenizer, conv.prompt(), config.num_video_tokens, config.num_audio_tokens)
    embeds = generate.embed_with_media(config, params, np.asarray([ids]), video, audio)
    shown, generated = "", []

    def stream(tokens):
      nonlocal shown
      generated.extend(int(t) for t in tokens[0] if t not in stop_ids)
      text = conv_lib.visible_prefix(tokenizer.decode(generated, skip_special_tokens=True), template.stop_strings)
      print(text[len(shown):], end="", flush=True)
      shown = text

    out = session.generate(ids, embeds, max_new_tokens=args.max_new_tokens, sampling=sampling,
                           stop_token_ids=stop_ids, stop_strings=template.stop_strings, tokenizer=tokenizer,
                           seed=seed, on_tokens=stream)
    if out.texts[0].startswith(shown):  # a held-back tail that turned out not to start a stop string
      print(out.texts[0][len(shown):], end="")
    print()
    conv.answer(conv_lib.clean_answer(template, out.texts[0]))

  try:
    return _answer_or_loop(answer, args.question, args.seed, "Ask about the media and press enter")
  except ValueError as e:  # the conversation outgrew the context
    print(f"\nerror: {e}; start a new chat", file=sys.stderr)
    return 1


def cmd_infer(args) -> int:
  import json

  import numpy as np
  from tqdm import tqdm

  from vllm_jax import generate, pretrained
  from vllm_jax.data import conversation as conv_lib
  from vllm_jax.data.media import MediaError, load_media
  from vllm_jax.data.tokenizer import left_pad
  config, params, tokenizer = pretrained.load_video_llama(args.model, mesh=_mesh(args.mesh), dtype=args.dtype)
  use_audio = _use_audio(args, config)
  if use_audio is None:
    print(f"error: --audio: {args.model} has no audio branch", file=sys.stderr)
    return 2
  template = conv_lib.get_template(config.template)
  sampling = generate.SamplingConfig(args.temperature, args.top_k, args.top_p)
  stop_ids = _stop_ids(config.llama, tokenizer)
  num_frames = args.num_frames or config.num_frames
  clip_config = _clip_config(config)
  audio_shape = (clip_config.num_clips, 1, clip_config.num_mel_bins, clip_config.num_frames)

  with open(args.input) as f:
    lines = f.read().splitlines()
  done = _answered(args.output)
  pending = [i for i, line in enumerate(lines) if line.strip() and i not in done]
  print(f"{len(done)} of {len(lines)} lines already answered; {len(pending)} to go", file=sys.stderr)

  with open(args.output, "a") as out, tqdm(total=len(pending), unit="item", file=sys.stderr) as bar:
    def write(record):
      out.write(json.dumps(record) + "\n")
      out.flush()

    for start in range(0, len(pending), args.batch_size):
      batch = []
      for i in pending[start:start + args.batch_size]:
        record = {"line": i}
        try:
          item = json.loads(lines[i])
          record.update({k: item[k] for k in ("id", "video", "image") if k in item})
          path, question = item.get("video") or item.get("image"), item.get("question")
          if not path or not isinstance(question, str):
            raise ValueError('each line needs "video" (or "image") and "question"')
          media = load_media(path, num_frames, config.vision.vit.image_size, with_audio=use_audio,
                             audio_config=clip_config)
        except (ValueError, FileNotFoundError, MediaError) as e:  # JSONDecodeError is a ValueError
          write({**record, "error": f"{type(e).__name__}: {e}"})
          bar.update()
          continue
        batch.append((record, question, media))
      if not batch:
        continue
      rows, frames, masks, clips = [], [], [], []
      for record, question, media in batch:
        record["audio"] = use_audio and media.audio_valid
        conv = conv_lib.Conversation.for_media(template, media.frames.timestamps, media.is_image, record["audio"])
        conv.ask(question)
        rows.append(conv_lib.encode_prompt(tokenizer, conv.prompt(), config.num_video_tokens,
                                           config.num_audio_tokens))
        frames.append(media.frames.frames)
        masks.append(media.frames.frame_mask)
        clips.append(media.audio if record["audio"] else np.zeros(audio_shape, np.float32))
      # Every batch has the same number of rows (copies of the first fill it) and carries audio
      # clips (zeros where unused) whenever audio is on: one compiled encoder serves all batches.
      fill = args.batch_size - len(batch)
      rows, frames, masks, clips = (x + x[:1] * fill for x in (rows, frames, masks, clips))
      ids, mask = left_pad(rows, multiple=32)
      video, audio = generate.encode_media(config, params, np.stack(frames), np.stack(masks),
                                           np.stack(clips) if use_audio else None)
      embeds = generate.embed_with_media(config, params, ids, video, audio)
      result = generate.generate(config.llama, params["llm"], inputs_embeds=embeds, attention_mask=mask,
                                 max_new_tokens=args.max_new_tokens, sampling=sampling, stop_token_ids=stop_ids,
                                 stop_strings=template.stop_strings, tokenizer=tokenizer, seed=args.seed + start)
      for (record, question, _), text in zip(batch, result.texts):
        write({**record, "question": question, "answer": conv_lib.clean_answer(template, text)})
        bar.update()
  return 0


def _answered(path: str) -> set[int]:
  """Input lines with an answer in `path`; other records (errors, a torn last line) are
  dropped from the file, so those lines are tried again."""
  import json
  import os
  if not os.path.exists(path):
    return set()
  keep, done = [], set()
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if "answer" in record and record.get("line") not in done:
        done.add(record["line"])
        keep.append(json.dumps(record) + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)
  return done


def load_config(spec: str, overrides: list[str]):
  """`FILE[:ARG]` -> FILE's get_config(ARG), then each `--config.a.b=VALUE` applied."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("train_config", path)
  if module_spec is None or not path.endswith(".py"):
    raise ValueError(f"--config {spec!r}: expected a .py file, optionally with :ARG")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg else module.get_config()
  for override in overrides:
    key, eq, value = override.removeprefix("--config.").partition("=")
    if not override.startswith("--config.") or not eq:
      raise ValueError(f"unrecognised argument {override!r}; overrides look like --config.train.steps=100")
    *parents, name = key.split(".")
    node = cfg
    for part in parents:
      node = node[part]
    if name not in node:
      raise ValueError(f"--config.{key}: the config has no field {key!r}")
    node[name] = _coerce(value, node[name], key)
  return cfg


def _coerce(value: str, current, key: str):
  """The override string as the type of the field's current value."""
  import ast
  try:
    if isinstance(current, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
      return value.lower() in ("true", "1")
    if isinstance(current, (int, float)):
      return type(current)(value)
    if isinstance(current, (tuple, list)):
      if value[:1] in "([":
        return type(current)(ast.literal_eval(value))
      kind = type(current[0]) if current else str
      return type(current)(kind(v) for v in value.split(",") if v)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"--config.{key}={value}: not a {type(current).__name__}") from e
  return value


def cmd_train(args, overrides: list[str]) -> int:
  import logging

  from vllm_jax.train import sharding
  from vllm_jax.train import video_llama as train_lib
  try:
    cfg = load_config(args.config, overrides)
  except (ValueError, KeyError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sharding.initialize_distributed()
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
  result = train_lib.train(cfg)
  state = "preempted at" if result.preempted else "done at"
  print(f"{state} step {int(result.state.step)}; {result.skipped_examples} unreadable examples skipped",
        file=sys.stderr)
  return 0


def cmd_make_dataset(args) -> int:
  from vllm_jax.data import synthetic
  try:
    paths = synthetic.make_dataset(args.out, args.num_train, args.num_val, seed=args.seed)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(f"{k}: {v}" for k, v in paths.items()))
  return 0


def cmd_demo(args, overrides: list[str]) -> int:
  from vllm_jax import demo
  from vllm_jax.configs import demo as demo_config
  try:
    cfg = load_config(args.config or demo_config.__file__, overrides)
  except (ValueError, KeyError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return demo.main(cfg)


def _sampling_flags(parser) -> None:
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
  parser.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0 = off)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  parser.add_argument("--mesh", default=None,
                      help="data,fsdp,tensor mesh sizes, e.g. 1,1,-1 for tensor parallel over all devices")


def _media_flags(parser) -> None:
  parser.add_argument("--audio", action=argparse.BooleanOptionalAction, default=None,
                      help="use the video's audio track (default: when the model has an audio branch)")
  parser.add_argument("--num-frames", type=int, default=None, help="frames sampled per video (default: the model's)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="vllm-jax", description="Video LLMs in JAX/Flax: convert weights, chat, train.",
      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  convert = commands.add_parser("convert", help="convert PyTorch/HF weights into a vllm_jax model folder")
  sources = convert.add_subparsers(dest="source", required=True, metavar="SOURCE")
  llama = sources.add_parser(
      "llama", help="an HF LLaMA/Vicuna/Llama-2/3 folder (safetensors or .bin shards)",
      description="Convert an HF LLaMA folder (config.json, weights, tokenizer) into a vllm_jax "
                  "model folder: config.json, orbax params/ and the tokenizer files. Tensors are "
                  "streamed one at a time; any missing, unexpected or mis-shaped key is named.")
  llama.add_argument("--hf-dir", required=True, help="folder with config.json and the weight files")
  llama.add_argument("--out", required=True, help="output model folder (created)")
  llama.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="store parameters in this dtype (default: float32)")
  llama.set_defaults(run=cmd_convert_llama)
  vl = sources.add_parser(
      "video-llama", help="Video-LLaMA: LLaMA folder + EVA ViT-g + BLIP-2 + VL/AL finetuned + ImageBind",
      description="Assemble a Video-LLaMA model folder (one orbax checkpoint, config.json and the tokenizer "
                  "with the <ImageHere>/<AudioHere> placeholders) from the released parts. File flags "
                  "override the `checkpoints` entries of configs/video_llama.py; without --al the model "
                  "is vision-only.")
  vl.add_argument("--config", default="7b", choices=["7b", "13b", "tiny"], help="configs/video_llama.py size")
  vl.add_argument("--llama-dir", help="HF LLaMA/Vicuna/LLaMA-2 folder (weights, config.json, tokenizer)")
  vl.add_argument("--eva-vit", help="eva_vit_g.pth")
  vl.add_argument("--blip2", help="LAVIS BLIP-2 .pth (image Q-Former, query tokens, ln_vision)")
  vl.add_argument("--hf-blip2", help="or a transformers Blip2 folder/file (ViT, ln_vision, image Q-Former)")
  vl.add_argument("--vl", help="Video-LLaMA vision-language finetuned .pth")
  vl.add_argument("--al", help="Video-LLaMA audio-language finetuned .pth")
  vl.add_argument("--imagebind", help="imagebind_huge.pth (default: the AL file's audio_encoder.* keys)")
  vl.add_argument("--template", choices=["vicuna_v0", "llama_2"], default=None,
                  help="conversation template (default vicuna_v0; llama_2 for LLaMA-2-chat models)")
  vl.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                  help="store the LLaMA parameters in this dtype (default: float32)")
  vl.add_argument("--out", required=True, help="output model folder (created)")
  vl.set_defaults(run=cmd_convert_video_llama)

  chat = commands.add_parser(
      "chat", help="generate from a converted model, streaming tokens",
      description="Answer one --question, or read prompts interactively from the terminal (a multi-turn "
                  "conversation for video models: the media are encoded once and the KV cache is kept "
                  "between turns). Tokens are printed as they are generated. A missing or corrupt media "
                  "file is reported and the command exits with status 2; a video without audio is "
                  "answered from its frames.")
  chat.add_argument("--model", required=True, help="a model folder written by `vllm-jax convert`")
  chat.add_argument("--question", default=None, help="answer this prompt and exit")
  chat.add_argument("--video", default=None, help="a video file to talk about (video_llama models)")
  chat.add_argument("--image", default=None, help="an image file (jpg/png/webp) to talk about")
  _media_flags(chat)
  _sampling_flags(chat)
  chat.set_defaults(run=cmd_chat)

  infer = commands.add_parser(
      "infer", help="answer a JSONL file of questions about videos/images, batched and resumable",
      description='Each input line is {"video": path (or "image": path), "question": text, "id": optional}. '
                  'Each output line repeats "line" (the input line number), "id", the media path and '
                  'the question, with "answer" or, for a bad line or a missing or undecodable file, '
                  '"error"; the other items go on. Rerunning skips the lines already answered and '
                  'retries the errors.')
  infer.add_argument("--model", required=True, help="a video_llama model folder")
  infer.add_argument("--input", required=True, help="questions, one JSON object per line")
  infer.add_argument("--output", required=True, help="answers, appended one JSON object per line")
  infer.add_argument("--batch-size", type=int, default=4)
  _media_flags(infer)
  _sampling_flags(infer)
  infer.set_defaults(run=cmd_infer)

  train = commands.add_parser("train", help="train Video-LLaMA (sharded, checkpointed, resumable)",
                              description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="vllm-jax train --config FILE[:ARG] [--config.a.b=VALUE ...]")
  train.add_argument("--config", required=True, metavar="FILE[:ARG]",
                     help="config file and its get_config argument, e.g. configs/video_llama.py:stage1")
  train.set_defaults(run=cmd_train)

  make = commands.add_parser(
      "make-dataset", help="write the synthetic shapes-and-sounds video dataset (mp4 + WebVid CSV + JSON)",
      description="Short mp4 videos (H.264 + AAC) of a coloured shape moving left/right/up/down while a low "
                  "tone, a high tone or noise plays, captioned with all four; train and val splits from "
                  "different seeds, as WebVid-style CSVs and LLaVA-style conversation JSON. Deterministic; "
                  "an existing identical dataset is kept.")
  make.add_argument("--out", required=True, help="output folder")
  make.add_argument("--num-train", type=int, default=480)
  make.add_argument("--num-val", type=int, default=96)
  make.add_argument("--seed", type=int, default=0, help="the train split's seed (val: seed + 1)")
  make.set_defaults(run=cmd_make_dataset)

  demo = commands.add_parser(
      "demo", help="train a tiny audio-visual Video-LLaMA on synthetic videos, evaluate it and chat",
      description="Generate the synthetic dataset (cached), train a tiny Video-LLaMA with `vllm-jax train`'s "
                  "code, save the model, caption the held-out videos with `vllm-jax infer`, print the "
                  "per-attribute accuracy, write report.png and answer a question with `vllm-jax chat`. "
                  "Ablations: --config.model.use_frame_pos=False, --config.model.use_audio=False; other "
                  "--config.a.b=VALUE flags as for `train` (e.g. --config.demo.workdir=DIR, "
                  "--config.train.steps=N).",
      usage="vllm-jax demo [--config FILE[:ARG]] [--config.a.b=VALUE ...]")
  demo.add_argument("--config", default=None, metavar="FILE[:ARG]", help="default: configs/demo.py")
  demo.set_defaults(run=cmd_demo)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if args.command in ("train", "demo"):
    return args.run(args, extra)
  if extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
