"""Greedy decoding speed: vllm_jax against transformers' `generate`, same weights, same CPU.

    python benchmarks/decode.py [--new-tokens 128] [--batches 1,8] [--threads 1|all]

Both sides decode exactly `--new-tokens` tokens (no early stop) from the same random prompts; the
time to the first token (the prompt, one sampled token) and compile time are reported apart. After
a warm-up the sides run in turn and each keeps its best of `--repeats` (thread modes: common.py).
Prints a table and one JSON line per batch size: ratio > 1 means vllm_jax is faster.
"""

from common import add_arguments, interleaved, setup

RUN = setup()

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig as HFLlamaConfig  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from vllm_jax import generate as gen  # noqa: E402
from vllm_jax.converters import llama as llama_conv  # noqa: E402
from vllm_jax.data.tokenizer import left_pad  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--repeats", type=int, default=3)
  add_arguments(parser)
  args = parser.parse_args()

  torch.manual_seed(0)
  hf = LlamaForCausalLM(HFLlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
      num_key_value_heads=args.hidden // 64, eos_token_id=None, pad_token_id=0)).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    config, params = llama_conv.load_hf(tmp, progress=False)
  params = jax.device_put(params)
  print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32; "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; "
        f"torch threads {torch.get_num_threads()}, jax devices {jax.devices()}")

  rows, results = [], []
  for batch in (int(b) for b in args.batches.split(",")):
    rng = np.random.RandomState(batch)
    ids, mask = left_pad([rng.randint(3, args.vocab, args.prompt_len - i % 4).tolist() for i in range(batch)])
    run = lambda: gen.generate(config, params, input_ids=ids, attention_mask=mask,
                               max_new_tokens=args.new_tokens)
    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    first = lambda: gen.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=1)

    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
    with torch.inference_mode():
      hf_run = lambda: hf.generate(t_ids, attention_mask=t_mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
      ours, ref = interleaved(args.repeats, run, hf_run)
      ours_first, ref_first = interleaved(args.repeats, first, lambda: hf.generate(
          t_ids, attention_mask=t_mask, max_new_tokens=1, do_sample=False, pad_token_id=0))
      same = np.array_equal(hf_run()[:, ids.shape[1]:].numpy(), run().tokens)

    tokens = batch * args.new_tokens
    rows.append((batch, compile_s, ours_first * 1e3, ref_first * 1e3, tokens / ours, tokens / ref, same))
    results.append({"benchmark": f"decode_batch{batch}", "ours": round(tokens / ours, 1),
                    "reference": round(tokens / ref, 1), "unit": "tokens/s", "ratio": round(ref / ours, 2)})

  print(f"\n{'batch':>5} {'compile s':>9} {'1st token ms':>12} {'HF 1st token ms':>15} "
        f"{'tokens/s':>9} {'HF tokens/s':>11} {'ratio':>6} {'same tokens':>11}")
  for batch, compile_s, p, hp, ours, ref, same in rows:
    print(f"{batch:>5} {compile_s:>9.2f} {p:>12.1f} {hp:>15.1f} {ours:>9.0f} {ref:>11.0f} "
          f"{ours / ref:>6.2f} {str(same):>11}")
  RUN.report(results)


if __name__ == "__main__":
  main()
