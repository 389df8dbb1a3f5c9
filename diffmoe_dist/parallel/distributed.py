"""Process-group set-up and the small distributed chores every entry point shares.

Whatever launched us (torchrun, SLURM, mpirun, a plain ``python``), ``init_distributed`` resolves the
rank and world size, picks the backend (nccl on GPU, gloo on CPU) and always passes a timeout so a
collective that cannot complete fails instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffmoe_dist.launch_env import resolve_launch_env


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "" when single process


def init_distributed(backend: str = "auto", timeout_s: int = 300) -> DistInfo:
    """Initialise the default process group if the launch has several ranks."""
    env = resolve_launch_env()
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError(
            "parallel.backend='nccl' but no CUDA device is visible; use 'gloo' or 'auto'"
        )
    if use_cuda:
        n_gpu = torch.cuda.device_count()
        if env.local_rank >= n_gpu:
            raise ValueError(
                f"local rank {env.local_rank} has no GPU: {n_gpu} visible on this node "
                "(more processes per node than GPUs?)"
            )
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    if env.world_size == 1:
        return DistInfo(0, 1, 0, device, "")
    env.export()
    name = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
    if not dist.is_initialized():
        dist.init_process_group(
            backend=name,
            init_method="env://",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if name == "nccl" else None,
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank, device, name)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args: object) -> None:
    if is_rank0():
        print(*args, flush=True)


def all_reduce_scalars(
    values: list[float], group: dist.ProcessGroup | None, op: str = "mean"
) -> list[float]:
    """Reduce a few Python floats over ``group`` (identity when group is None)."""
    if group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    if op == "mean":
        t /= dist.get_world_size(group)
    return t.tolist()


def barrier(group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.barrier(group=group)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
