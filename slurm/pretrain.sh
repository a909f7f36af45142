#!/bin/bash
# Multi-node pretraining: one task per GPU, rendezvous from the Slurm environment, requeue on preemption.
#   sbatch --nodes=4 slurm/pretrain.sh train/configs/mae_vit_l.yaml [section.key=value ...]
#SBATCH --job-name=vitssl
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch slurm/pretrain.sh CONFIG [section.key=value ...]}
shift
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-$SLURM_JOB_ID}  # a requeued job keeps its id, so its dir

# Time limit or preemption: USR1 reaches this shell 180 s early; pass it to every task (they checkpoint
# and exit cleanly), then requeue. The requeued job resumes from RUN_DIR/checkpoints/latest.
trap 'echo "USR1: checkpointing and requeueing $SLURM_JOB_ID"; kill -USR1 "$SRUN_PID"; wait "$SRUN_PID";
      scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1

srun --cpu_bind=v --accel-bind=gn python -u -m train.pretrain --config "$CONFIG" \
    run.output_dir="$RUN_DIR" run.resume=auto "$@" &
SRUN_PID=$!
wait "$SRUN_PID"
