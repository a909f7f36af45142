#!/bin/bash
# Multi-node pretraining on Slurm: one process per GPU, rendezvous from the Slurm environment,
# checkpoint + requeue before the time limit, automatic resume when the job starts again.
#
#   sbatch slurm/pretrain.sh CONFIG [section.key=value ...]                         # 1 node x 8 GPUs
#   sbatch --nodes=4 slurm/pretrain.sh CONFIG [...]                                 # 4 nodes x 8 GPUs
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 slurm/pretrain.sh CONFIG # 2 nodes x 4 GPUs
#   LAUNCHER=deepspeed sbatch --nodes=4 slurm/pretrain.sh CONFIG [...]              # deepspeed launcher + hostfile
#
# Submit from the repository root (or with the package installed). Environment knobs:
#   RUN_DIR      run directory (config.yaml, checkpoints/, tb/, metrics.jsonl); default
#                runs/<config name>-<job id>. A requeued job keeps its id, hence its directory;
#                set RUN_DIR to continue a run under a new job.
#   LAUNCHER     srun (default: srun starts every rank) | deepspeed (srun starts one `deepspeed`
#                launcher per node with --no_ssh and a hostfile written to RUN_DIR/hostfile)
#   PYTHON       interpreter (default: python); MASTER_PORT (default: 20000 + job id % 20000)
#
# Time limit: Slurm sends USR1 to this script 180 s before the end (--signal); every rank then
# checkpoints at the end of its current step and exits, and the job requeues itself. Preemption
# (SIGTERM to every process) also makes the ranks checkpoint; with --requeue Slurm brings the job
# back. Either way the new start resumes from RUN_DIR/checkpoints/latest (run.resume=auto).
#SBATCH --job-name=vitssl
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

die() { echo "slurm/pretrain.sh: $*" >&2; exit 2; }
[[ $# -ge 1 ]] || die "usage: sbatch slurm/pretrain.sh CONFIG [section.key=value ...]"
[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit with sbatch (or run inside salloc)"
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "config file not found: $CONFIG (submit from the repository root)"

LAUNCHER=${LAUNCHER:-srun}
PYTHON=${PYTHON:-python}
NNODES=${SLURM_NNODES:-1}
PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
if [[ -n ${SLURM_GPUS_ON_NODE:-} && $SLURM_GPUS_ON_NODE != "$PER_NODE" ]]; then
  die "$SLURM_GPUS_ON_NODE GPUs but $PER_NODE tasks per node: set --ntasks-per-node equal to --gpus-per-node"
fi
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # no `| head`: SIGPIPE + pipefail
[[ ${#HOSTS[@]} -ge 1 && -n ${HOSTS[0]} ]] || die "scontrol show hostnames $SLURM_JOB_NODELIST gave no host"
export MASTER_ADDR=${HOSTS[0]}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-$SLURM_JOB_ID}
mkdir -p "$RUN_DIR"
TRAIN_ARGS=(--config "$CONFIG" run.output_dir="$RUN_DIR" run.resume=auto "$@")
echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES nodes x $PER_NODE GPUs via" \
     "$LAUNCHER, master $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

STEP_PID=
requeue() {
  echo "$(date -Is) USR1 (time limit near): checkpointing, then requeueing job $SLURM_JOB_ID"
  if [[ -n $STEP_PID ]]; then
    kill -USR1 "$STEP_PID" 2>/dev/null || true  # srun passes it to every process of the step
    wait "$STEP_PID" || true
  fi
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
preempted() {
  echo "$(date -Is) SIGTERM (preemption or scancel): the ranks checkpoint and exit"
  [[ -z $STEP_PID ]] || wait "$STEP_PID" || true
  exit 143
}
trap requeue USR1
trap preempted TERM

# Slurm >= 22.05 no longer passes --cpus-per-task from sbatch to srun: give it explicitly.
if [[ $LAUNCHER == srun ]]; then
  srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --cpu-bind=verbose \
    "$PYTHON" -u -m train.pretrain "${TRAIN_ARGS[@]}" &
elif [[ $LAUNCHER == deepspeed ]]; then
  HOSTFILE=$RUN_DIR/hostfile
  printf "%s slots=$PER_NODE\n" "${HOSTS[@]}" >"$HOSTFILE"
  # One launcher per node starts that node's ranks. The launchers ignore USR1 (inherited by the
  # ranks, which install their own handler), so the signal reaches the ranks without killing
  # the launchers that Slurm waits on.
  srun --kill-on-bad-exit=1 --ntasks="$NNODES" --ntasks-per-node=1 \
    --cpus-per-task=$((PER_NODE * ${SLURM_CPUS_PER_TASK:-1})) --cpu-bind=verbose \
    bash -c 'trap "" USR1; exec "$0" -u -m deepspeed.launcher.runner --hostfile "$1" --no_ssh \
             --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
             --module train.pretrain "${@:2}"' "$PYTHON" "$HOSTFILE" "${TRAIN_ARGS[@]}" &
else
  die "LAUNCHER=$LAUNCHER: choose srun or deepspeed"
fi
STEP_PID=$!
wait "$STEP_PID"
