#!/usr/bin/env bash
# Container entrypoint: one torchrun agent per container (= per node) running the trainer.
#
#   docker run IMAGE [--set key=value ...]   torchrun ... -m diffmoe_dist.train --config $CONFIG
#                                            --set run.dir=$RUN_DIR [your args]
#   docker run IMAGE bash|python|...         runs that command instead (debugging)
#
# Knobs (environment, defaults in brackets):
#   NNODES [1]             number of nodes (containers) in the job
#   NPROC_PER_NODE [auto]  workers per node; auto = number of visible GPUs, or 1 without GPUs
#   RDZV_ENDPOINT          host:port of the c10d rendezvous (usually node 0's hostname:29400);
#                          required when NNODES > 1 and RDZV_BACKEND=c10d
#   RDZV_BACKEND [c10d]    c10d (node ranks assigned by rendezvous) or static (uses NODE_RANK,
#                          MASTER_ADDR, MASTER_PORT)
#   RDZV_ID [diffmoe]      job id shared by all nodes of one job
#   NODE_RANK [0]          this node's rank (static backend only)
#   MASTER_ADDR, MASTER_PORT [29500]   static backend only
#   MAX_RESTARTS [0]       torchrun --max-restarts (elastic restart of the worker group)
#   CONFIG [configs/tiny.yaml]  trainer config (relative paths are under $DIFFMOE_HOME)
#   RUN_DIR [/runs/default]     run directory (bind-mount a host or shared dir here)
#   TRAIN_MODULE [diffmoe_dist.train]  module torchrun runs
#   TRAIN_SCRIPT            a script path to run instead of TRAIN_MODULE (smoke tests); then
#                           CONFIG / RUN_DIR are not passed, only your args
#   NETWORK_ENV [launchers/network_env.sh]  file sourced first (NCCL / Gloo interface settings)
set -euo pipefail

die() { echo "entrypoint: error: $*" >&2; exit 2; }
log() { echo "entrypoint[$(hostname)]: $*" >&2; }

# compose's `command: ${TRAIN_ARGS:-}` passes one empty argument when TRAIN_ARGS is unset.
if [[ $# -eq 1 && -z ${1} ]]; then
  shift
fi
# A command (not an option) as first argument: run it as is.
if [[ $# -gt 0 && ${1} != -* ]]; then
  exec "$@"
fi

cd "${DIFFMOE_HOME:-/opt/diffmoe-dist}"
# Network settings (NCCL/Gloo interfaces, IB): the project's file unless NETWORK_ENV names another.
# Values already in the environment (docker run -e, compose) win over the file's defaults.
if [[ -n ${NETWORK_ENV:-} ]]; then
  [[ -r ${NETWORK_ENV} ]] || die "NETWORK_ENV=${NETWORK_ENV} is not a readable file"
  # shellcheck disable=SC1090
  source "${NETWORK_ENV}"
elif [[ -r launchers/network_env.sh ]]; then
  # shellcheck disable=SC1091
  source launchers/network_env.sh
fi

NNODES="${NNODES:-1}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
RDZV_ID="${RDZV_ID:-diffmoe}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
CONFIG="${CONFIG:-configs/tiny.yaml}"
RUN_DIR="${RUN_DIR:-/runs/default}"
TRAIN_MODULE="${TRAIN_MODULE:-diffmoe_dist.train}"

[[ ${NNODES} =~ ^[1-9][0-9]*$ ]] || die "NNODES=${NNODES} must be a positive integer"
num_gpus=$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [[ -z ${NPROC_PER_NODE:-} || ${NPROC_PER_NODE} == auto ]]; then
  NPROC_PER_NODE=$((num_gpus > 0 ? num_gpus : 1))
fi
[[ ${NPROC_PER_NODE} =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=${NPROC_PER_NODE} must be a positive integer"
if ((num_gpus > 0 && NPROC_PER_NODE > num_gpus)); then
  die "NPROC_PER_NODE=${NPROC_PER_NODE} but only ${num_gpus} GPU(s) are visible in this container"
fi

# Resolve the head node now: an unresolvable name would otherwise hang inside the rendezvous.
check_host() {
  local host=$1
  getent hosts "${host}" >/dev/null || die "cannot resolve rendezvous host '${host}' from $(hostname)"
}

launch=(torchrun --nnodes "${NNODES}" --nproc-per-node "${NPROC_PER_NODE}" --max-restarts "${MAX_RESTARTS}")
case "${RDZV_BACKEND}" in
  c10d)
    if [[ -z ${RDZV_ENDPOINT:-} ]]; then
      ((NNODES == 1)) || die "NNODES=${NNODES} needs RDZV_ENDPOINT=host:port (node 0's hostname)"
      launch+=(--standalone)
    else
      [[ ${RDZV_ENDPOINT} == *:* ]] || die "RDZV_ENDPOINT=${RDZV_ENDPOINT} must be host:port"
      check_host "${RDZV_ENDPOINT%:*}"
      launch+=(--rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT}" --rdzv-id "${RDZV_ID}")
    fi
    ;;
  static)
    : "${MASTER_ADDR:?static rendezvous needs MASTER_ADDR}"
    check_host "${MASTER_ADDR}"
    launch+=(--node-rank "${NODE_RANK:-0}" --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}")
    ;;
  *) die "RDZV_BACKEND=${RDZV_BACKEND}: use c10d or static" ;;
esac

if [[ -n ${TRAIN_SCRIPT:-} ]]; then
  [[ -r ${TRAIN_SCRIPT} ]] || die "TRAIN_SCRIPT=${TRAIN_SCRIPT} is not a readable file"
  launch+=("${TRAIN_SCRIPT}" "$@")
else
  [[ -r ${CONFIG} ]] || die "CONFIG=${CONFIG} does not exist (relative paths are under $(pwd))"
  mkdir -p "${RUN_DIR}" 2>/dev/null || die "RUN_DIR=${RUN_DIR} cannot be created"
  [[ -w ${RUN_DIR} ]] || die "RUN_DIR=${RUN_DIR} is not writable by uid $(id -u)"
  launch+=(--module "${TRAIN_MODULE}" --config "${CONFIG}" --set "run.dir=${RUN_DIR}" "$@")
fi

log "nnodes=${NNODES} nproc_per_node=${NPROC_PER_NODE} gpus=${num_gpus} rdzv=${RDZV_BACKEND}:${RDZV_ENDPOINT:-${MASTER_ADDR:-standalone}}"
log "exec ${launch[*]}"
exec "${launch[@]}"
