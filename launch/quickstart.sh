#!/usr/bin/env bash
# The quickstart: install into ./.venv, make a small random LLaMA in the HF format (with a real
# sentencepiece tokenizer), convert it, and generate from it. The answer is gibberish (random
# weights); every step is the one you run on real weights.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/install.sh
work=${1:-runs/quickstart}
python launch/make_random_llama.py "$work/hf"
vllm-jax convert llama --hf-dir "$work/hf" --out "$work/model"
vllm-jax chat --model "$work/model" --question "what does the video show?" --max-new-tokens 24
