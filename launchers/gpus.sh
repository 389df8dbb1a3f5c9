# shellcheck shell=bash
# GPU counting for the launchers (sourced). `count_gpus` prints how many GPUs this process may use
# on this node, from what the scheduler or the user made visible, in this order:
#   1. CUDA_VISIBLE_DEVICES when set (by SLURM's gres plugin, a container runtime or the user):
#      the number of entries; "", "-1" and "NoDevFiles" mean none. nvidia-smi ignores this variable,
#      so counting with `nvidia-smi -L` would launch workers for GPUs CUDA will not show them.
#   2. inside a SLURM job: SLURM_STEP_GPUS, then SLURM_JOB_GPUS (lists of indices), then
#      SLURM_GPUS_ON_NODE (a count). A SLURM job with none of them was allocated no GPU, even when
#      the node has some (`nvidia-smi -L` may list them when devices are not constrained).
#   3. otherwise (no scheduler) `nvidia-smi -L`, or 0 without nvidia-smi.
# tests/test_launchers.py runs it with these variables set and a stand-in nvidia-smi on PATH.

_count_list() { # "0,1,3" -> 3
  local -a ids
  IFS=, read -r -a ids <<<"$1"
  echo "${#ids[@]}"
}

count_gpus() {
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    case $CUDA_VISIBLE_DEVICES in
    "" | -1 | NoDevFiles) echo 0 ;;
    *) _count_list "$CUDA_VISIBLE_DEVICES" ;;
    esac
    return
  fi
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    local v
    for v in SLURM_STEP_GPUS SLURM_JOB_GPUS; do
      if [[ -n ${!v:-} ]]; then
        _count_list "${!v}"
        return
      fi
    done
    echo "${SLURM_GPUS_ON_NODE:-0}"
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}
