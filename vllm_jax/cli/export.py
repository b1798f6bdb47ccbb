"""`vllm-jax export`: a training run's checkpoint -> a model folder, a PEFT adapter, an HF LLaMA."""

import sys
import time

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
  export.add_argument("--out", metavar="MODEL_DIR", help="model folder to write (created)")
  export.add_argument("--keep-lora", action="store_true",
                      help="with --out: keep the LoRA adapters apart instead of merging them")
  export.add_argument("--peft", metavar="DIR", help="PEFT adapter folder to write (created)")
  export.add_argument("--peft-base", default="", metavar="NAME",
                      help="base_model_name_or_path in the adapter config, e.g. lmsys/vicuna-7b-v1.5")
  export.add_argument("--hf-llama", metavar="DIR", help="Hugging Face LLaMA folder to write (created)")
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
    model.save(args.out)
    print(f"wrote model folder {args.out}{' (LoRA merged)' if adapters and not args.keep_lora else ''}")
  if args.peft:
    peft.save_adapter(config.llama, params["llm"], args.peft, base_model=args.peft_base)
    print(f"wrote PEFT adapter {args.peft} (rank {adapters.rank}, alpha {adapters.alpha:g})")
  if args.hf_llama:
    llama_format.save_hf(plain_llama, merged_llm, args.hf_llama)
    save_tokenizer(model.tokenizer, args.hf_llama)
    print(f"wrote Hugging Face LLaMA {args.hf_llama}{' (LoRA merged)' if adapters else ''}")
  return 0
