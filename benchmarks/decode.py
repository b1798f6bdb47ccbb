"""Greedy decoding speed: vllm_jax against transformers' `generate`, same weights, same CPU.

    python benchmarks/decode.py [--new-tokens 128] [--batches 1,8]

Both sides decode exactly `--new-tokens` tokens (no early stop) from the same random prompts.
Compile time is reported apart; steady-state numbers are the best of `--repeats` runs.
Prints a table and one JSON line per batch size: ratio > 1 means vllm_jax is faster.
"""

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from vllm_jax import generate as gen
from vllm_jax.converters import llama as llama_conv
from vllm_jax.data.tokenizer import left_pad
from vllm_jax.models.llama import KVCache


def best_of(repeats, fn):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--repeats", type=int, default=3)
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
    compile_s = best_of(1, run)
    ours = best_of(args.repeats, run)
    embeds = gen.embed_tokens(config, params, jnp.asarray(ids))
    prefill = lambda: jax.block_until_ready(gen.prefill(
        config, gen.SamplingConfig(), args.new_tokens, params,
        KVCache.init(config, batch, ids.shape[1] + args.new_tokens), embeds, jnp.asarray(mask),
        jnp.asarray([-1], jnp.int32), jax.random.key(0), jnp.asarray(0, jnp.int32)).tokens)
    ours_prefill = best_of(args.repeats, prefill)

    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
    with torch.inference_mode():
      hf_run = lambda: hf.generate(t_ids, attention_mask=t_mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
      hf_run()  # warm-up
      ref = best_of(args.repeats, hf_run)
      ref_prefill = best_of(args.repeats, lambda: hf(t_ids, attention_mask=t_mask))
      same = np.array_equal(hf_run()[:, ids.shape[1]:].numpy(), run().tokens)

    tokens = batch * args.new_tokens
    rows.append((batch, compile_s, ours_prefill * 1e3, ref_prefill * 1e3, tokens / ours, tokens / ref, same))
    results.append({"benchmark": f"decode_batch{batch}", "ours": round(tokens / ours, 1),
                    "reference": round(tokens / ref, 1), "unit": "tokens/s", "ratio": round(ref / ours, 2)})

  print(f"\n{'batch':>5} {'compile s':>9} {'prefill ms':>10} {'HF prefill ms':>13} "
        f"{'tokens/s':>9} {'HF tokens/s':>11} {'ratio':>6} {'same tokens':>11}")
  for batch, compile_s, p, hp, ours, ref, same in rows:
    print(f"{batch:>5} {compile_s:>9.2f} {p:>10.1f} {hp:>13.1f} {ours:>9.0f} {ref:>11.0f} "
          f"{ours / ref:>6.2f} {str(same):>11}")
  for result in results:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
