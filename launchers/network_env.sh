# shellcheck shell=bash
# Network and collective-library settings for multi-node runs. Sourced by launchers/slurm_train.sh,
# launchers/torchrun_local.sh and launchers/mpirun_train.sh; edit here, not in the launchers.
#
# Every setting uses `: "${VAR:=default}"`, so a value already in the environment (from the user,
# the cluster's module system, or sbatch --export) wins over the default written here. Lines that are
# commented out are cluster-specific: uncomment and adapt them for your fabric.

# ---- NCCL (GPU collectives) ------------------------------------------------------------------------
# Which log lines NCCL prints: WARN is quiet; INFO shows the chosen transport (IB / socket) and rings,
# the first thing to check when a multi-node run is slow. NCCL_DEBUG_SUBSYS=INIT,NET narrows INFO.
: "${NCCL_DEBUG:=WARN}"
export NCCL_DEBUG

# Network interface for NCCL's bootstrap and socket transport. Leave unset to let NCCL pick; set it
# when nodes have several interfaces and NCCL picks one the other nodes cannot reach ("^lo,docker"
# excludes by prefix; "ib0" or "eth0" selects by prefix).
# export NCCL_SOCKET_IFNAME=^lo,docker

# InfiniBand / RoCE. NCCL_IB_DISABLE=1 forces TCP sockets (useful to prove that IB is the problem).
# NCCL_IB_HCA picks adapters (e.g. mlx5_0,mlx5_1), NCCL_IB_GID_INDEX=3 is the usual RoCE v2 index,
# NCCL_IB_TIMEOUT raises the IB verbs retry timeout on large fabrics.
# export NCCL_IB_DISABLE=0
# export NCCL_IB_HCA=mlx5
# export NCCL_IB_GID_INDEX=3
# export NCCL_IB_TIMEOUT=22
# GPUDirect RDMA level (how close NIC and GPU must be for direct reads); PHB is a common safe value.
# export NCCL_NET_GDR_LEVEL=PHB

# A rank that hits a NCCL error or a collective timeout tears the process group down and exits
# instead of hanging forever; torchrun then sees the failure and can restart (elastic) or stop.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING
# Record collective call stacks for the flight recorder, dumped when a collective times out.
: "${TORCH_FR_BUFFER_SIZE:=2000}"
export TORCH_FR_BUFFER_SIZE

# ---- Gloo (CPU collectives, and the CPU fallback of these launchers) ------------------------------
# Interface for Gloo's TCP pairs. Unset = the interface of the hostname's address. On the local test
# cluster every node is this host, so "lo" would also do; on real clusters pick the data network.
# export GLOO_SOCKET_IFNAME=eth0

# ---- torch.distributed ----------------------------------------------------------------------------
# OFF | INFO | DETAIL. DETAIL checks that every rank calls the same collectives with matching shapes
# (slow; use it to debug a hang, not for training).
: "${TORCH_DISTRIBUTED_DEBUG:=OFF}"
export TORCH_DISTRIBUTED_DEBUG

# One intra-op thread per rank unless told otherwise: several ranks share a node's cores, and the
# default (all cores per process) oversubscribes the CPU badly on the gloo/CPU path.
: "${OMP_NUM_THREADS:=1}"
export OMP_NUM_THREADS

# Unbuffered Python output, so the job log shows what each rank did up to the moment it died.
: "${PYTHONUNBUFFERED:=1}"
export PYTHONUNBUFFERED
