#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task (one jax process) per GPU.
#   sbatch --nodes=4 launch/slurm.sh -m vllm_jax.cli train --config configs/video_llama.py:stage1 \
#       --config.mesh.fsdp=8 --config.train.workdir=/shared/runs/stage1
# jax.distributed.initialize() reads the coordinator, process count, process id and the task's GPU
# from SLURM's variables (vllm_jax.train.sharding.initialize_distributed calls it when SLURM_NTASKS > 1).
#SBATCH --job-name=vllm-jax-train
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
. .venv/bin/activate
# --signal=TERM@120 sends SIGTERM two minutes before the time limit: training checkpoints and stops.
srun --kill-on-bad-exit=1 python "$@"
