#!/usr/bin/env bash
# Create ./.venv (when absent) and install vllm_jax into it with its dev extras.
# Sourced by test.sh and quickstart.sh; leaves the environment activated.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0          # the CPU build; installed first so nothing pulls a CUDA one
pip install -q -e '.[dev]'
