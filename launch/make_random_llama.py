"""Write a randomly initialised HF LLaMA folder with a real sentencepiece tokenizer.

    python launch/make_random_llama.py OUT_DIR [--hidden 256 --layers 4]

Stands in for a downloaded checkpoint where none can be fetched (the weights are random).
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_jax.data.tokenizer import train_tokenizer

CORPUS = [
    "a red circle moves to the left while a low tone plays",
    "a blue square moves up and a high tone sounds",
    "the video shows a green triangle moving right in silence",
    "what does the video show? describe the sound you hear.",
]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out_dir")
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  tokenizer = train_tokenizer(CORPUS * 20, args.out_dir, vocab_size=400)
  torch.manual_seed(args.seed)
  config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=max(1, args.hidden // 128), bos_token_id=1, eos_token_id=2)
  model = LlamaForCausalLM(config)
  model.save_pretrained(args.out_dir)
  print(f"random LLaMA ({model.num_parameters() / 1e6:.1f}M parameters) and tokenizer written to {args.out_dir}")


if __name__ == "__main__":
  main()
