#!/usr/bin/env bash
# Train with ranks started by MPI (for clusters whose scheduler launches with mpirun/mpiexec).
#
#   launchers/mpirun_train.sh                                     # 2 ranks, configs/tiny.yaml
#   NP=4 CONFIG=configs/digits.yaml launchers/mpirun_train.sh --set parallel.ep=4
#
# Each rank learns its rank, world size and local rank from MPI (diffmoe_dist/parallel/launch_env.py, with
# mpi4py); rank 0 picks a free port and broadcasts it with its address, and torch.distributed then
# initialises from env://. MPI only starts the processes: the collectives are gloo or NCCL.
# The default mpiexec is the one of the `mpich` wheel (no system MPI needed); on a cluster set
# MPIEXEC to the site's launcher and MPI_ARGS to its options (hostfile, binding, ...).
#
# Knobs: NP (2), CONFIG (configs/tiny.yaml), RUN_DIR (unset: the config's run.dir),
# MPIEXEC (mpiexec), MPI_ARGS (empty, word-split), PYTHON (python). Arguments go to the trainer.
set -euo pipefail

die() {
  echo "mpirun_train: error: $*" >&2
  exit 2
}

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_DIR"
# shellcheck source=launchers/network_env.sh
source "$REPO_DIR/launchers/network_env.sh"

NP=${NP:-2}
CONFIG=${CONFIG:-configs/tiny.yaml}
MPIEXEC=${MPIEXEC:-mpiexec}
PYTHON=${PYTHON:-python}
read -r -a mpi_args <<<"${MPI_ARGS:-}"

[[ -f $CONFIG ]] || die "config file '$CONFIG' does not exist (set CONFIG)"
[[ $NP =~ ^[1-9][0-9]*$ ]] || die "NP='$NP' is not a positive number"
command -v "$MPIEXEC" >/dev/null ||
  die "'$MPIEXEC' not found: pip install -c constraints.txt mpi4py mpich, or set MPIEXEC"
"$PYTHON" -c "import mpi4py" 2>/dev/null ||
  die "mpi4py is not importable by $PYTHON: pip install -c constraints.txt mpi4py mpich"
# shellcheck source=launchers/common.sh
source "$REPO_DIR/launchers/common.sh"

echo "mpirun_train: $NP rank(s) via $MPIEXEC, config $CONFIG, extra args: $*" >&2
exec "$MPIEXEC" -n "$NP" "${mpi_args[@]}" "$PYTHON" -m diffmoe_dist.train \
  --config "$CONFIG" "${run_dir_args[@]}" "$@"
