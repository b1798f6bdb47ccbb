#!/usr/bin/env bash
# Training under SLURM: one task (one jax process) per GPU, resources from sbatch's options, e.g.
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 launch/slurm.sh \
#       -m vllm_jax.cli train --config configs/video_llama.py:stage1 --config.mesh.fsdp=8 \
#       --config.train.workdir=/shared/runs/stage1
# Arguments go to python. jax.distributed.initialize() reads the coordinator, process count, process id
# and the task's GPU (one per task: SLURM_LOCALID) from SLURM's variables
# (vllm_jax.train.sharding.initialize_distributed calls it when SLURM_NTASKS > 1).
# The python: $VLLM_JAX_PYTHON when set; else the active virtualenv or conda environment's (sbatch
# passes the submitting shell's environment on); else this checkout's .venv; else `python` on PATH.
#SBATCH --job-name=vllm-jax-train
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail
script=${BASH_SOURCE[0]}
if [[ -n "${SLURM_JOB_ID:-}" ]]; then  # sbatch runs a copy of this script: the checkout is the submitted one's
  script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
fi
root=$(cd "$(dirname "$script")/.." && pwd)
if [[ -n "${VLLM_JAX_PYTHON:-}" ]]; then
  python=$VLLM_JAX_PYTHON
elif [[ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" && -x "$root/.venv/bin/python" ]]; then
  python=$root/.venv/bin/python
else
  python=python
fi
# --signal=TERM@120 sends SIGTERM two minutes before the time limit: training checkpoints and stops
# (raise it with sbatch --signal=TERM@600 when a step compiles or a checkpoint saves for longer).
srun --kill-on-bad-exit=1 "$python" "$@"
