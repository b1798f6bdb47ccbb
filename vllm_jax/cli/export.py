"""`vllm-jax export`: a training run's checkpoint -> a model folder, a PEFT adapter, an HF LLaMA."""

import sys
import time

from vllm_jax import paths
from vllm_jax.cli import flags

HELP = """Turn a training run into something to use or share. Checkpoints of a run hold only what it
trained (unless train.save_frozen): the rest comes from the model folder the run started from
(init_from, recorded with the whole config in WORKDIR/run.json). Reads the latest checkpoint, or
--step N's; the optimizer state is not read. Writes any of:

  --out MODEL_DIR    a model folder (`chat`, `infer`, `train --config.init_from=` read it), with the
                     LoRA adapters merged into the LLM's kernels (W + alpha/rank * A B), so it runs
                     at the base model's speed; --keep-lora keeps them apart (and the LoRA config).
  --peft DIR         the LLM's LoRA adapters as a PEFT folder (adapter_config.json,
                     adapter_model.safetensors) for transformers/peft over the base LLaMA (name it in
                     the adapter's config with --peft-base). Only the LLM's adapters: connectors
                     that trained with them are in --out.
  --hf-llama DIR     the LLM alone, adapters merged, as a Hugging Face LLaMA folder (config.json,
                     safetensors, the tokenizer with the media placeholders) that transformers'
                     LlamaForCausalLM.from_pretrained loads.

Each folder is written beside its place and appears only once complete. One that already holds
something is refused, unless --overwrite (then it is replaced once the new one is complete); one
that is or holds the run's workdir, its init_from or another output is always refused.

A run from a random init (no init_from) can be exported only if its checkpoints hold the frozen
parameters too (train.save_frozen=true).
"""

EPILOG = """examples:
  vllm-jax export --workdir ./runs/lora --out ./models/video-llava-lora
  vllm-jax export --workdir ./runs/lora --step 2000 --peft ./adapters/video-llava-lora \\
      --peft-base lmsys/vicuna-7b-v1.5
  vllm-jax export --workdir ./runs/lora --hf-llama ./hf/vicuna-7b-video
"""


def add_parser(commands) -> None:
  export = commands.add_parser("export", help="turn a training run's checkpoint into a model folder, PEFT "
                               "adapter or HF LLaMA", description=HELP, epilog=EPILOG,
                               formatter_class=flags.argparse.RawDescriptionHelpFormatter)
  export.add_argument("--workdir", required=True, type=flags.existing_folder, metavar="DIR",
                      help="the run's train.workdir (run.json, checkpoints/)")
  export.add_argument("--step", type=flags.number(int, 0), default=None, metavar="N",
                      help="checkpoint step (default: the latest)")
  export.add_argument("--out", metavar="MODEL_DIR", help="model folder to write (new or empty)")
  export.add_argument("--keep-lora", action="store_true",
                      help="with --out: keep the LoRA adapters apart instead of merging them")
  export.add_argument("--peft", metavar="DIR", help="PEFT adapter folder to write (new or empty)")
  export.add_argument("--peft-base", default="", metavar="NAME",
                      help="base_model_name_or_path in the adapter config, e.g. lmsys/vicuna-7b-v1.5")
  export.add_argument("--hf-llama", metavar="DIR", help="Hugging Face LLaMA folder to write (new or empty)")
  flags.overwrite_flag(export)
  export.set_defaults(run=run)


def run(args) -> int:
  if not (args.out or args.peft or args.hf_llama):
    return flags.error("nothing to write: give --out, --peft and/or --hf-llama")
  if args.keep_lora and not args.out:
    return flags.error("--keep-lora applies to --out")
  if args.peft_base and not args.peft:
    return flags.error("--peft-base applies to --peft")
  from vllm_jax.converters import llama as llama_format
  from vllm_jax.converters import peft
  from vllm_jax.data.tokenizer import save_tokenizer
  from vllm_jax.nn import lora
  from vllm_jax.train import run as run_lib
  init_from = run_lib.read_run_file(args.workdir)["init_from"]
  inputs = {"--workdir": args.workdir, "the run's init_from": init_from and paths.shown(init_from)}
  for flag, path in (("--out", args.out), ("--peft", args.peft), ("--hf-llama", args.hf_llama)):
    if path:
      flags.check_output_folder(flag, path, args.overwrite, inputs)
      inputs[flag] = path  # nor may the outputs cover one another
  start = time.perf_counter()
  model, step = run_lib.trained_model(args.workdir, args.step)
  config, params = model.config, model.params
  adapters = config.llama.lora
  if args.peft and adapters is None:
    return flags.error(f"the run in {args.workdir} trained no LoRA adapters (model.llama.lora unset): nothing "
                       "for --peft")
  described = f", LoRA rank {adapters.rank} on {'/'.join(adapters.targets)}" if adapters else ""
  print(f"restored step {step} of {args.workdir} ({model.model_type}{described}) in "
        f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
  plain_llama = config.llama.replace(lora=None)
  merged_llm = None
  if args.hf_llama or (args.out and not args.keep_lora):
    merged_llm = lora.merge(params["llm"], adapters) if adapters else params["llm"]
  if args.out:
    if not args.keep_lora:
      model.config, model.params = config.replace(llama=plain_llama), {**params, "llm": merged_llm}
    with paths.staged_folder(args.out, replace=args.overwrite) as out:
      model.save(out)
    print(f"wrote model folder {args.out}{' (LoRA merged)' if adapters and not args.keep_lora else ''}")
  if args.peft:
    with paths.staged_folder(args.peft, replace=args.overwrite) as out:
      peft.save_adapter(config.llama, params["llm"], out, base_model=args.peft_base)
    print(f"wrote PEFT adapter {args.peft} (rank {adapters.rank}, alpha {adapters.alpha:g})")
  if args.hf_llama:
    with paths.staged_folder(args.hf_llama, replace=args.overwrite) as out:
      llama_format.save_hf(plain_llama, merged_llm, out)
      save_tokenizer(model.tokenizer, out)
    print(f"wrote Hugging Face LLaMA {args.hf_llama}{' (LoRA merged)' if adapters else ''}")
  return 0
