#!/usr/bin/env bash
# Train DiffMoE as a SLURM batch job: one srun task per node, each running a torchrun agent that
# starts NPROC_PER_NODE workers; the agents meet through c10d rendezvous on the job's first node.
#
#   sbatch --nodes=2 launchers/slurm_train.sh                        # defaults below
#   CONFIG=configs/tiny.yaml RUN_DIR=runs/t1 sbatch launchers/slurm_train.sh --set train.steps=100
#
# Submit from the repository root (or set REPO_DIR). Arguments after the script name go to the
# trainer unchanged ("$@"), e.g. `--set parallel.ep=2 --set train.steps=500`.
#
# Knobs (environment variables; sbatch exports the submitting shell's environment by default):
#   CONFIG          trainer config file                       (configs/tiny.yaml)
#   RUN_DIR         run directory: checkpoints, metrics, logs (runs/$SLURM_JOB_NAME)
#                   Keep it fixed to resume: a rerun with the same RUN_DIR continues from its
#                   latest complete checkpoint.
#   DEVICE          cuda | cpu                                (cuda)
#                   cuda: the job must have GPUs (--gpus-per-node); without one it stops with an
#                   error instead of training on CPU. cpu: gloo workers on CPU, GPUs or not.
#   GPUS_PER_NODE   GPUs to use per node                      (all the job may use on the node:
#                   CUDA_VISIBLE_DEVICES, SLURM_STEP_GPUS / SLURM_JOB_GPUS / SLURM_GPUS_ON_NODE;
#                   launchers/gpus.sh)
#   NPROC_PER_NODE  workers per node                          (GPUS_PER_NODE; 2 with DEVICE=cpu)
#   CPUS_PER_TASK   CPUs of the one srun task per node, shared by its workers
#                   ($SLURM_CPUS_ON_NODE: every CPU the job holds on the node). Passed to srun
#                   explicitly: srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05), and
#                   under core binding a step without it puts every worker on one core. Each
#                   worker gets OMP_NUM_THREADS = CPUS_PER_TASK / NPROC_PER_NODE unless already set.
#   RDZV_HOST       rendezvous host                           (first node of the job)
#   RDZV_PORT       rendezvous port                           (29500 + job id mod 1000)
#   RDZV_JOIN_TIMEOUT  seconds the agents wait for each other (300)
#   MAX_RESTARTS    torchrun elastic restarts after a worker failure (0)
#   REPO_DIR        repository root                           ($SLURM_SUBMIT_DIR)
#   TORCHRUN        torchrun executable                       (torchrun)
#
# Preemption and time limits. `--signal=USR1@T` (no "B:") makes SLURM send SIGUSR1 to the processes of
# every job step, T seconds (give or take the ~60 s of SLURM's timer resolution) before the time
# limit. The workers get it directly: each finishes its step, the ranks agree, a complete checkpoint
# is written, rank 0 writes $RUN_DIR/PREEMPTED, and the workers exit 0. The torchrun agent is started
# under `trap "" USR1`, because a bare agent dies of SIGUSR1 (rc 138) and would kill its workers
# mid-save; the workers install their own handler, which replaces the inherited "ignore". After srun
# returns, this script sees PREEMPTED, removes it, and runs `scontrol requeue` (allowed by
# --requeue); the requeued job resumes from the checkpoint. `scancel --signal=USR1 JOBID` takes the
# same path on demand. "B:USR1" would signal only this batch shell: it is handled too (the shell
# forwards the signal to the step through srun), but it is one hop longer and `scancel --signal`
# without --batch never reaches the shell, so the direct step signal is the default.
# SIGTERM (scancel, the time limit, a scheduler preemption) reaches every process: the workers save
# the same way and this shell waits for them, but does not requeue (the owner cancelled it, or SLURM
# requeues by itself); a rerun with the same RUN_DIR resumes. SLURM sends SIGKILL KillWait seconds
# after SIGTERM, so the signal-at-T path is the one that leaves time to save.
#
#SBATCH --job-name=diffmoe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Cluster-specific lines: remove one "#" to enable.
##SBATCH --time=04:00:00
##SBATCH --gpus-per-node=8
##SBATCH --cpus-per-task=64         # CPUs per node for all its workers (one task per node)
##SBATCH --exclusive
set -euo pipefail

die() {
  echo "slurm_train: error: $*" >&2
  exit 2
}
log() { echo "slurm_train: $*" >&2; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a SLURM job: submit with 'sbatch launchers/slurm_train.sh'"

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $REPO_DIR/launchers/network_env.sh && -d $REPO_DIR/diffmoe_dist ]] ||
  die "REPO_DIR=$REPO_DIR is not the diffmoe-dist repository: submit from its root or set REPO_DIR"
cd "$REPO_DIR"
# shellcheck source=launchers/network_env.sh
source "$REPO_DIR/launchers/network_env.sh"

CONFIG=${CONFIG:-configs/tiny.yaml}
RUN_DIR=${RUN_DIR:-runs/$SLURM_JOB_NAME}
RDZV_JOIN_TIMEOUT=${RDZV_JOIN_TIMEOUT:-300}
MAX_RESTARTS=${MAX_RESTARTS:-0}
TORCHRUN=${TORCHRUN:-torchrun}
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

# ---- validate everything before anything is launched ---------------------------------------------
[[ -f $CONFIG ]] || die "config file '$CONFIG' does not exist (relative to $REPO_DIR; set CONFIG)"
CONFIG=$(realpath "$CONFIG")

mkdir -p "$RUN_DIR" 2>/dev/null || die "cannot create run dir '$RUN_DIR' (set RUN_DIR)"
probe=$(mktemp -p "$RUN_DIR" .write-probe.XXXXXX 2>/dev/null) ||
  die "run dir '$RUN_DIR' is not writable (set RUN_DIR)"
rm -f "$probe"
RUN_DIR=$(realpath "$RUN_DIR")

command -v "$TORCHRUN" >/dev/null || die "'$TORCHRUN' not found on PATH (set TORCHRUN or activate the env)"

# shellcheck source=launchers/gpus.sh
source "$REPO_DIR/launchers/gpus.sh"
DEVICE=${DEVICE:-cuda}
device_args=()
if [[ $DEVICE == cuda ]]; then
  gpus_visible=$(count_gpus)
  ((gpus_visible > 0)) ||
    die "no GPU allocated to this job on $(hostname) (CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS and" \
      "SLURM_GPUS_ON_NODE are empty): add --gpus-per-node=N to the sbatch line, or set DEVICE=cpu" \
      "to train on CPU"
  if [[ -n ${GPUS_PER_NODE:-} ]]; then
    [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE='$GPUS_PER_NODE' is not a positive number"
    ((GPUS_PER_NODE <= gpus_visible)) ||
      die "GPUS_PER_NODE=$GPUS_PER_NODE but this job may use $gpus_visible GPU(s) on $(hostname)"
  else
    GPUS_PER_NODE=$gpus_visible
  fi
  NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS_PER_NODE}
  [[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE='$NPROC_PER_NODE' is not a positive number"
  ((NPROC_PER_NODE <= GPUS_PER_NODE)) ||
    die "NPROC_PER_NODE=$NPROC_PER_NODE is more than GPUS_PER_NODE=$GPUS_PER_NODE"
  backend="nccl, $GPUS_PER_NODE GPU(s) per node"
elif [[ $DEVICE == cpu ]]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-2}
  device_args=(--set parallel.backend=gloo)
  backend="gloo on CPU (DEVICE=cpu)"
else
  die "DEVICE='$DEVICE' is not cuda or cpu"
fi
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE='$NPROC_PER_NODE' is not a positive number"
CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
cpu_args=()
if [[ -n $CPUS_PER_TASK ]]; then
  [[ $CPUS_PER_TASK =~ ^[1-9][0-9]*$ ]] || die "CPUS_PER_TASK='$CPUS_PER_TASK' is not a positive number"
  cpu_args=(--cpus-per-task="$CPUS_PER_TASK")
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(((CPUS_PER_TASK / NPROC_PER_NODE) > 0 ? CPUS_PER_TASK / NPROC_PER_NODE : 1))}
  ((CPUS_PER_TASK >= NPROC_PER_NODE)) ||
    log "warning: $CPUS_PER_TASK CPU(s) per node for $NPROC_PER_NODE workers; add --cpus-per-task to the sbatch line"
fi

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
RDZV_HOST=${RDZV_HOST:-$HEAD_NODE}
# An unresolvable rendezvous host makes every agent hang in rendezvous; fail now instead.
getent hosts "$RDZV_HOST" >/dev/null ||
  die "rendezvous host '$RDZV_HOST' does not resolve on $(hostname) (check DNS or /etc/hosts, or set RDZV_HOST)"
RDZV_PORT=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $NODES node(s) x" \
  "$NPROC_PER_NODE worker(s), $backend, ${CPUS_PER_TASK:-default} CPU(s) per node; rendezvous $RDZV_HOST:$RDZV_PORT"
log "config $CONFIG, run dir $RUN_DIR, extra args: $*"

# ---- launch ---------------------------------------------------------------------------------------
# One task per node; inside it the agent ignores USR1 (see the header), its workers handle it.
# shellcheck disable=SC2016  # expanded by the inner bash, on each node
srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 "${cpu_args[@]}" --kill-on-bad-exit=1 --label \
  bash -c 'trap "" USR1; exec "$0" "$@"' \
  "$TORCHRUN" \
  --nnodes="$NODES" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" \
  --rdzv-id="$SLURM_JOB_ID" \
  --rdzv-conf="join_timeout=$RDZV_JOIN_TIMEOUT" \
  --max-restarts="$MAX_RESTARTS" \
  -m diffmoe_dist.train \
  --config "$CONFIG" \
  --set "run.dir=$RUN_DIR" \
  "${device_args[@]}" \
  "$@" &
srun_pid=$!

# The batch shell survives USR1/TERM (B: signals, scancel --batch, the time limit) and passes them to
# the step through srun, which forwards them to its tasks; then it keeps waiting for srun.
got_term=0
forward() {
  log "batch shell got SIG$1, forwarding to the step"
  [[ $1 == TERM ]] && got_term=1
  kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
while true; do
  wait "$srun_pid" && rc=0 || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break # wait was interrupted by a trapped signal: wait again
done
trap - USR1 TERM

if [[ -f $RUN_DIR/PREEMPTED ]]; then
  log "trainer saved and stopped early: $(cat "$RUN_DIR/PREEMPTED"); srun exit code $rc"
  rm -f "$RUN_DIR/PREEMPTED"
  if ((got_term)); then
    # SIGTERM means scancel, the time limit, or a scheduler preemption (which requeues by itself):
    # requeueing here would resurrect a job its owner cancelled.
    log "stopped by SIGTERM (scancel, time limit or preemption): not requeueing;" \
      "sbatch again with RUN_DIR=$RUN_DIR to resume"
    exit 143
  fi
  log "requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint in $RUN_DIR"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed: resubmit this script with RUN_DIR=$RUN_DIR to resume"
  exit 0
fi
if ((rc != 0)); then
  log "training failed: srun exit code $rc (see the lines above; rerun with the same RUN_DIR resumes)"
  exit "$rc"
fi
if [[ -f $RUN_DIR/final.json ]]; then
  log "done: $(cat "$RUN_DIR/final.json")"
else
  log "srun exited 0 but $RUN_DIR/final.json is missing"
  exit 3
fi
