"""The `vllm-jax` command."""

import argparse
import sys
import time

EPILOG = """examples:
  vllm-jax convert llama --hf-dir ./vicuna-7b --out ./models/vicuna-7b
  vllm-jax chat --model ./models/vicuna-7b --question "What is a llama?"
"""


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


def cmd_chat(args) -> int:
  from vllm_jax import generate, pretrained
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

  if args.question is not None:
    answer(args.question, args.seed)
    return 0
  print("Type a prompt and press enter; an empty line or Ctrl-D quits.")
  for turn in range(sys.maxsize):
    try:
      line = input("> ").strip()
    except EOFError:
      break
    if not line:
      break
    answer(line, args.seed + turn)
  return 0


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

  chat = commands.add_parser(
      "chat", help="generate from a converted model, streaming tokens",
      description="Answer one --question, or read prompts interactively from the terminal. "
                  "Tokens are printed as they are generated.")
  chat.add_argument("--model", required=True, help="a model folder written by `vllm-jax convert`")
  chat.add_argument("--question", default=None, help="answer this prompt and exit")
  chat.add_argument("--max-new-tokens", type=int, default=128)
  chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
  chat.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0 = off)")
  chat.add_argument("--seed", type=int, default=0)
  chat.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  chat.add_argument("--mesh", default=None,
                    help="data,fsdp,tensor mesh sizes, e.g. 1,1,-1 for tensor parallel over all devices")
  chat.set_defaults(run=cmd_chat)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
