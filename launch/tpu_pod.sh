#!/usr/bin/env bash
# Training on a Cloud TPU pod slice: the same command on every host, one jax process per host.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh -m vllm_jax.cli train \
#       --config configs/video_llama.py:stage1 --config.train.workdir=gs://bucket/stage1
# Set up each host first (copies this checkout and installs it into .venv):
#   SETUP=1 TPU_NAME=... ZONE=... bash launch/tpu_pod.sh
# TPU hosts find each other without configuration; on preemption every host gets SIGTERM, agrees on
# a step through jax's preemption service, checkpoints and exits cleanly. Use a gs:// workdir
# (--config.train.workdir=gs://bucket/run) so every host writes to the same place.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
DIR=vllm_jax
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}
if [[ "${SETUP:-0}" == 1 ]]; then
  gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all "$(dirname "$0")/.." "$TPU_NAME:$DIR"
  ssh_all "cd $DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]'"
  exit 0
fi
ssh_all "cd $DIR && . .venv/bin/activate && python $(printf '%q ' "$@")"
