"""`vllm-jax convert SOURCE`: PyTorch/HF weights (or a PEFT adapter) -> a vllm_jax model folder."""

import time

from vllm_jax import paths
from vllm_jax.cli import flags

DTYPES = ["float32", "bfloat16", "float16"]


def add_parser(commands) -> None:
  convert = commands.add_parser("convert", help="convert PyTorch/HF weights into a vllm_jax model folder")
  sources = convert.add_subparsers(dest="source", required=True, metavar="SOURCE")

  llama = sources.add_parser(
      "llama", help="an HF LLaMA/Vicuna/Llama-2/3 folder (safetensors or .bin shards)",
      description="Convert an HF LLaMA folder (config.json, weights, tokenizer) into a vllm_jax "
                  "model folder: config.json, orbax params/ and the tokenizer files. Tensors are "
                  "streamed one at a time; any missing, unexpected or mis-shaped key is named.")
  llama.add_argument("--hf-dir", required=True, type=hf_folder, help="folder with config.json and the weight files")
  out_flags(llama)
  llama.add_argument("--dtype", default=None, choices=DTYPES, help="store parameters in this dtype (default: float32)")
  llama.set_defaults(run=convert_llama)

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
  vl.add_argument("--imagebind", help="imagebind_huge.pth (required with --al: the AL file holds no encoder weights)")
  vl.add_argument("--template", choices=["vicuna_v0", "llama_2"], default=None,
                  help="conversation template (default vicuna_v0; llama_2 for LLaMA-2-chat models)")
  vl.add_argument("--dtype", default=None, choices=DTYPES,
                  help="store the LLaMA parameters in this dtype (default: float32)")
  out_flags(vl)
  vl.set_defaults(run=convert_video_llama)

  lv = sources.add_parser(
      "video-llava", help="Video-LLaVA: a transformers -hf folder or the original LanguageBind checkpoint",
      description="Convert Video-LLaVA into a model folder (one orbax checkpoint, config.json and the tokenizer "
                  "with the <image>/<video> placeholders). --hf-dir reads a transformers "
                  "VideoLlavaForConditionalGeneration folder (e.g. Video-LLaVA-7B-hf: plain CLIP video tower); "
                  "--original reads the original checkpoint (e.g. Video-LLaVA-7B: LanguageBind video tower "
                  "with temporal attention), its LLaMA sizes from the folder's config.json and its towers from "
                  "configs/video_llava.py --config. Tensors are streamed; any missing, unexpected or "
                  "mis-shaped key is named.")
  source = lv.add_mutually_exclusive_group(required=True)
  source.add_argument("--hf-dir", type=hf_folder,
                      help="transformers Video-LLaVA folder (config.json, safetensors, tokenizer)")
  source.add_argument("--original", type=hf_folder,
                      help="original Video-LLaVA folder (config.json, weight shards, tokenizer)")
  lv.add_argument("--config", default="7b-original", choices=["7b", "7b-original", "tiny"],
                  help="configs/video_llava.py size for --original")
  lv.add_argument("--dtype", default=None, choices=DTYPES, help="store parameters in this dtype (default: float32)")
  out_flags(lv)
  lv.set_defaults(run=convert_video_llava)

  vid = sources.add_parser(
      "llama-vid", help="LLaMA-VID: the reference's model folder (+ eva_vit_g.pth, a BERT tokenizer)",
      description="Convert a LLaMA-VID folder (config.json, pytorch_model-*.bin or safetensors shards, the LLaMA "
                  "tokenizer) into a model folder: one orbax checkpoint, config.json, the LLaMA tokenizer with the "
                  "<image> placeholder and the Q-Former's BERT tokenizer (instruction_tokenizer/). Released "
                  "folders may lack the EVA ViT-g tower, which the reference reads from LAVIS' eva_vit_g.pth: "
                  "give it with --eva-vit (given, it replaces any tower in the folder). A stage-1 folder "
                  "(config.json + mm_projector.bin) needs its base LLaMA/Vicuna folder (--base-llm). Tensors are "
                  "streamed; any missing, unexpected or mis-shaped key is named.")
  vid.add_argument("--model-dir", required=True, type=hf_folder,
                   help="LLaMA-VID folder (config.json, weights, tokenizer)")
  vid.add_argument("--bert-tokenizer", required=True, type=flags.existing_folder,
                   help="bert-base-uncased tokenizer folder (vocab.txt); [DEC] is added if missing, as the "
                        "reference does")
  vid.add_argument("--eva-vit", type=flags.existing_file, help="LAVIS eva_vit_g.pth (the vision tower)")
  vid.add_argument("--base-llm", type=hf_folder,
                   help="base LLaMA/Vicuna folder, for a stage-1 folder holding only mm_projector.bin")
  vid.add_argument("--dtype", default=None, choices=DTYPES, help="store parameters in this dtype (default: float32)")
  out_flags(vid)
  vid.set_defaults(run=convert_llama_vid)

  pe = sources.add_parser(
      "peft", help="import a PEFT LoRA adapter into a model folder's LLM",
      description="Write a copy of a model folder (any system, or a plain LLaMA) whose LLM holds a PEFT LoRA "
                  "adapter (adapter_config.json + adapter_model.safetensors/.bin, as PeftModel.save_pretrained "
                  "writes it for a LLaMA): kept as adapters (lora_a/lora_b beside the kernels, the LoRA config in "
                  "config.json; `train` can go on training them), or with --merge folded into the kernels "
                  "(W + alpha/rank * A B), a plain model that runs at full speed. The adapter must fit the LLM "
                  "(its shapes are checked; any mismatch is named).")
  pe.add_argument("--model", required=True, type=flags.existing_folder, metavar="MODEL_DIR",
                  help="vllm_jax model folder (a system's, or a plain LLaMA's)")
  pe.add_argument("--adapter", required=True, type=flags.existing_folder, metavar="PEFT_DIR",
                  help="PEFT adapter folder")
  out_flags(pe)
  pe.add_argument("--merge", action="store_true", help="fold the adapter into the kernels")
  pe.set_defaults(run=convert_peft)


def out_flags(parser) -> None:
  parser.add_argument("--out", required=True, metavar="DIR",
                      help="output model folder, new or empty (it appears once complete)")
  flags.overwrite_flag(parser)


def hf_folder(path: str) -> str:
  """An argparse type: a checkpoint folder with its config.json."""
  if not flags.checked(paths.is_dir, path):
    raise flags.argparse.ArgumentTypeError(f"no such folder: {path}")
  if not flags.checked(paths.is_file, paths.join(path, "config.json")):
    raise flags.argparse.ArgumentTypeError(f"{path} has no config.json")
  return path


def _report(start: float, params, out: str, detail: str = "") -> None:
  import jax
  leaves = jax.tree.leaves(params)
  parts = ", ".join(f"{k} {sum(x.size for x in jax.tree.leaves(v)) / 1e6:.1f}M" for k, v in params.items())
  print(f"converted {sum(x.size for x in leaves) / 1e6:.1f}M parameters ({parts}{detail}; "
        f"{sum(x.nbytes for x in leaves) / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f}s -> {out}")


def convert_llama(args) -> int:
  import sys

  flags.check_output_folder("--out", args.out, args.overwrite, {"--hf-dir": args.hf_dir})
  from vllm_jax.converters import llama
  start = time.perf_counter()
  with paths.staged_folder(args.out, replace=args.overwrite) as out:
    config, params = llama.convert_hf(args.hf_dir, out, param_dtype=args.dtype)  # a tensor at a time
    copied = llama.copy_tokenizer(args.hf_dir, out)
  _report(start, {"llm": params}, args.out, f", {config.param_dtype}")
  if not copied:
    print("warning: no tokenizer files found next to the weights; `chat` needs them", file=sys.stderr)
  return 0


def convert_video_llama(args) -> int:
  from vllm_jax.configs import video_llama as video_llama_configs
  from vllm_jax.converters import core, video_llama_full
  from vllm_jax.models.video_llama import VideoLlamaConfig
  from vllm_jax.systems.video_llama import VideoLlamaSystem
  start = time.perf_counter()
  cfg = video_llama_configs.get_config(args.config)
  files = {k: getattr(args, k) or cfg.checkpoints[k] or None for k in cfg.checkpoints}
  if not files["llama_dir"]:
    return flags.error("--llama-dir (or checkpoints.llama_dir in the config) is required")
  if files["al"] and not files["imagebind"]:  # the released AL file dropped its frozen encoder on save
    return flags.error("--al needs --imagebind imagebind_huge.pth: the AL checkpoint holds no ImageBind weights")
  inputs = {f"--{key.replace('_', '-')}": path for key, path in files.items()}
  flags.check_output_folder("--out", args.out, args.overwrite, inputs)
  for key in ("eva_vit", "blip2", "vl", "al", "imagebind"):  # before the LLaMA's minutes of conversion
    if files[key]:
      core.check_torch_checkpoint(files[key])
  base = VideoLlamaConfig.from_dict(cfg.model.to_dict())
  if args.template:
    base = base.replace(template=args.template)
  config, params, tokenizer = video_llama_full.assemble(base, param_dtype=args.dtype, **files)
  with paths.staged_folder(args.out, replace=args.overwrite) as out:
    VideoLlamaSystem(config, params, tokenizer).save(out)
  _report(start, params, args.out, f"; {'with' if config.audio else 'without'} audio")
  return 0


def convert_video_llava(args) -> int:
  from vllm_jax.configs import video_llava as video_llava_configs
  from vllm_jax.converters import llama as llama_format
  from vllm_jax.converters import video_llava as video_llava_format
  from vllm_jax.data.tokenizer import load_tokenizer
  from vllm_jax.models.video_llava import VideoLlavaConfig
  from vllm_jax.systems.video_llava import VideoLlavaSystem
  start = time.perf_counter()
  folder = args.hf_dir or args.original
  flags.check_output_folder("--out", args.out, args.overwrite, {"--hf-dir" if args.hf_dir else "--original": folder})
  tokenizer = load_tokenizer(folder)
  ids = VideoLlavaSystem.add_media_tokens(tokenizer)
  if args.hf_dir:
    config, params = video_llava_format.load_hf(args.hf_dir, param_dtype=args.dtype)
  else:
    llama = llama_format.config_from_hf(paths.read_json(paths.join(folder, "config.json")))
    base = VideoLlavaConfig.from_dict(video_llava_configs.get_config(args.config).model.to_dict())
    config = base.replace(llama=llama, image_token_id=ids[0], video_token_id=ids[1])
    if args.dtype:
      config = video_llava_format.with_param_dtype(config, args.dtype)
    params = video_llava_format.load_original(folder, config)
  if ids != (config.image_token_id, config.video_token_id):
    return flags.error(f"the tokenizer in {folder} maps <image>/<video> to {list(ids)}, its config.json says "
                       f"{[config.image_token_id, config.video_token_id]}")
  with paths.staged_folder(args.out, replace=args.overwrite) as out:
    VideoLlavaSystem(config, params, tokenizer).save(out)
  temporal = config.video_tower.temporal_frames
  _report(start, params, args.out, f"; video tower {'with' if temporal else 'without'} temporal attention")
  return 0


def convert_llama_vid(args) -> int:
  flags.check_output_folder("--out", args.out, args.overwrite, {
      "--model-dir": args.model_dir, "--bert-tokenizer": args.bert_tokenizer, "--eva-vit": args.eva_vit,
      "--base-llm": args.base_llm})
  from vllm_jax.converters import llama_vid as llama_vid_format
  from vllm_jax.data.tokenizer import has_tokenizer, load_instruction_tokenizer, load_tokenizer
  from vllm_jax.systems.llama_vid import LlamaVidSystem
  start = time.perf_counter()
  folder = args.model_dir
  if args.base_llm and not has_tokenizer(folder):
    folder = args.base_llm  # a stage-1 folder has no tokenizer
  tokenizer = load_tokenizer(folder)
  (image_id,) = LlamaVidSystem.add_media_tokens(tokenizer)
  instruction_tokenizer = load_instruction_tokenizer(args.bert_tokenizer)
  if "[DEC]" not in instruction_tokenizer.get_vocab():
    instruction_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
  config = llama_vid_format.read_config(args.model_dir, param_dtype=args.dtype, image_token_id=image_id)
  LlamaVidSystem.check_instruction_tokenizer(config, instruction_tokenizer, args.bert_tokenizer)
  reader = llama_vid_format.open_sources(args.model_dir, eva_vit=args.eva_vit, base_llm=args.base_llm)
  params = llama_vid_format.convert_checkpoint(reader, config)
  with paths.staged_folder(args.out, replace=args.overwrite) as out:
    LlamaVidSystem(config, params, tokenizer, instruction_tokenizer).save(out)
  _report(start, params, args.out, f"; {config.vit.image_size} px, {config.tokens_per_frame} tokens per frame")
  return 0


def convert_peft(args) -> int:
  flags.check_output_folder("--out", args.out, args.overwrite, {"--model": args.model, "--adapter": args.adapter})
  from vllm_jax import pretrained, systems
  from vllm_jax.converters import peft
  from vllm_jax.data.tokenizer import save_tokenizer
  from vllm_jax.nn import lora
  from vllm_jax.train import optim
  start = time.perf_counter()
  plain = pretrained.model_type(args.model) == "llama"
  if plain:
    llama, llm, tokenizer = pretrained.load_llama(args.model)
  else:
    system = systems.load(args.model)
    llama, llm = system.config.llama, system.params["llm"]
  if llama.lora is not None:
    return flags.error(f"{args.model} already has LoRA adapters; import into a folder without (one written with "
                       "--merge, say)")
  llama, adapter = peft.load_adapter(args.adapter, llama)
  llm = optim.merge(adapter, llm)
  if args.merge:
    llm, llama = lora.merge(llm, llama.lora), llama.replace(lora=None)
  with paths.staged_folder(args.out, replace=args.overwrite) as out:
    if plain:
      pretrained.save_llama(out, llama, llm)
      if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    else:
      system.config, system.params = system.config.replace(llama=llama), {**system.params, "llm": llm}
      system.save(out)
  how = "merged into the kernels" if args.merge else f"kept as adapters (rank {llama.lora.rank})"
  _report(start, {"llm": llm}, args.out, f"; the LoRA of {args.adapter} {how}")
  return 0
