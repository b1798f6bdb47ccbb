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
# SLURM for tests/test_slurm.py (a one-node cluster on localhost, daemons as root; skipped without it).
if ! command -v sbatch >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >/dev/null 2>&1 \
    || echo "slurm-wlm not installed: tests/test_slurm.py skips"
fi
# The web page in a headless browser for tests/test_web.py: gradio, Playwright, and Debian's Chromium
# (Playwright's own browser download is not used; the test skips without Chromium).
pip install -q -e '.[web]' playwright
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  root=""; [ "$(id -u)" = 0 ] || root="sudo -n"
  { $root apt-get update -qq && $root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "chromium not installed: tests/test_web.py skips"
fi
# --- end of test-only references ---
python -m pytest tests -n 2 --durations=15 "$@"
