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
# Debian packages of the system tests, which skip without them: SLURM for tests/test_slurm.py (a
# one-node cluster on localhost, daemons as root) and Chromium for tests/test_web.py (Playwright
# drives it; its own browser download is not used).
packages=""
command -v sbatch >/dev/null || packages="slurm-wlm munge"
[ -x /usr/bin/chromium ] || packages="$packages chromium"
if [ -n "$packages" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages; } >/dev/null 2>&1 \
    || echo "could not install $packages: tests/test_slurm.py / tests/test_web.py skip"
fi
pip install -q -e '.[web]' playwright  # the web page's extra, and the browser driver of its test
# lmms-eval, the field's evaluation harness, with `--model vllm_jax` and against `vllm-jax serve`
# (tests/test_lmms_eval.py). Its declared dependencies would swap torch for a CUDA build: install it
# and what it imports by hand.
pip install -q --no-deps lmms-eval==0.7.3 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 \
  pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1
pip install -q datasets loguru python-dotenv sacrebleu evaluate tenacity "filelock<4"
# --- end of test-only references ---
python -m pytest tests -n 2 --durations=15 "$@"
