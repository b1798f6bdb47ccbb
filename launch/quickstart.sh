#!/usr/bin/env bash
# The quickstart: install into ./.venv, then `vllm-jax demo`: generate synthetic audio-visual videos,
# train a tiny Video-LLaMA on them (about ten minutes on a 2-core CPU), evaluate it on held-out
# videos, write report.png and answer a question about one of them. Extra arguments go to the demo
# (e.g. --config.model.use_audio=False).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/install.sh
vllm-jax demo "$@"
