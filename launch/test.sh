#!/usr/bin/env bash
# Install vllm_jax and its test dependencies into ./.venv (created when absent), then run the
# test suite. Extra arguments go to pytest, e.g. `bash launch/test.sh -k llama`.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/install.sh
# --- test-only PyTorch references (never imported by the library) ---
# ImageBind's reference code (CC BY-NC-SA 4.0: tests only); --no-deps keeps torchvision/timm out.
pip install -q --no-deps imagebind-unofficial==0.1.1 ftfy wcwidth iopath portalocker
# LanguageBind's video tower (MIT; Video-LLaVA's temporal attention); --no-deps: it pins transformers<5.
pip install -q --no-deps languagebind==0.1.0 peft accelerate
# --- end of test-only references ---
python -m pytest tests -n 2 --durations=15 "$@"
