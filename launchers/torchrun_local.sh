#!/usr/bin/env bash
# Train on this one machine with torchrun (no scheduler): NPROC workers, standalone rendezvous.
#
#   launchers/torchrun_local.sh                                   # configs/tiny.yaml, 2 workers
#   NPROC=4 CONFIG=configs/digits.yaml launchers/torchrun_local.sh --set parallel.ep=4
#
# Knobs: CONFIG (configs/tiny.yaml), DEVICE (auto: the GPUs this process may use, counted by
# launchers/gpus.sh from CUDA_VISIBLE_DEVICES / SLURM / nvidia-smi, else CPU; cuda: refuse to run
# without a GPU; cpu: gloo on CPU even where GPUs are visible), NPROC (number of GPUs if any, else 2),
# RUN_DIR (unset: the config's run.dir), MAX_RESTARTS (0; >0 restarts all workers from the latest
# checkpoint after a worker dies), TORCHRUN (torchrun). Arguments go to the trainer unchanged ("$@").
set -euo pipefail

die() {
  echo "torchrun_local: error: $*" >&2
  exit 2
}

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_DIR"
# shellcheck source=launchers/network_env.sh
source "$REPO_DIR/launchers/network_env.sh"

CONFIG=${CONFIG:-configs/tiny.yaml}
MAX_RESTARTS=${MAX_RESTARTS:-0}
TORCHRUN=${TORCHRUN:-torchrun}
DEVICE=${DEVICE:-auto}
# shellcheck source=launchers/gpus.sh
source "$REPO_DIR/launchers/gpus.sh"
device_args=()
case $DEVICE in
auto) gpus=$(count_gpus) ;;
cuda)
  gpus=$(count_gpus)
  ((gpus > 0)) || die "DEVICE=cuda but no GPU is visible (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-<unset>}')"
  ;;
cpu) gpus=0 ;;
*) die "DEVICE='$DEVICE' is not one of auto, cuda, cpu" ;;
esac
if ((gpus > 0)); then
  NPROC=${NPROC:-$gpus}
else
  NPROC=${NPROC:-2}
  device_args=(--set parallel.backend=gloo) # the launcher decided CPU: the workers must agree
fi

[[ -f $CONFIG ]] || die "config file '$CONFIG' does not exist (set CONFIG)"
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC='$NPROC' is not a positive number"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "MAX_RESTARTS='$MAX_RESTARTS' is not a number"
if ((gpus > 0 && NPROC > gpus)); then
  die "NPROC=$NPROC but this process may use $gpus GPU(s) (CUDA_VISIBLE_DEVICES / SLURM / nvidia-smi)"
fi
command -v "$TORCHRUN" >/dev/null || die "'$TORCHRUN' not found on PATH"
# shellcheck source=launchers/common.sh
source "$REPO_DIR/launchers/common.sh"

echo "torchrun_local: $NPROC worker(s) on $( ((gpus > 0)) && echo "$gpus GPU(s)" || echo CPU)," \
  "config $CONFIG, extra args: $*" >&2
exec "$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$NPROC" --max-restarts="$MAX_RESTARTS" \
  -m diffmoe_dist.train --config "$CONFIG" "${run_dir_args[@]}" "${device_args[@]}" "$@"
