"""Process-group set-up and the small distributed chores every entry point shares.

Whatever launched us (torchrun, SLURM, mpirun, a plain ``python``), ``init_distributed`` resolves the
rank and world size, picks the backend (nccl on GPU, gloo on CPU) and always passes a timeout so a
collective that cannot complete fails instead of hanging.

Every collective of the project outside the expert all-to-all (parallel/comm.py, whose inputs are
model activations) goes through the wrappers below (``all_reduce``, ``all_reduce_host``,
``all_reduce_scalars``, ``gather_rows_to_rank0``, ``barrier``, ``run_on_rank0``). They take the
trainer's device and check every tensor is on it: NCCL takes only CUDA tensors and fails (or hangs)
otherwise, which a CPU test run on gloo never shows. Host data (counters, Python floats, uint8
images) is moved to the device for the collective and brought back by the ``*_host`` / ``*_scalars``
/ ``gather_*`` wrappers. tests/test_collectives.py checks that no module calls torch.distributed
collectives directly.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from diffmoe_dist.parallel.launch_env import resolve_launch_env


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "" when single process


def choose_cuda_device(local_rank: int, device_count: int) -> int:
    """The CUDA device index of the process with ``local_rank`` when it sees ``device_count`` GPUs.

    - several processes of a node share the node's GPUs (torchrun, plain srun): cuda:<local rank>;
    - one GPU per process (``srun --gpus-per-task=1``, or CUDA_VISIBLE_DEVICES set per process): each
      process sees exactly its own GPU as cuda:0, whatever its local rank.
    Raises ValueError when the process has no GPU of its own (more processes than GPUs).
    """
    if device_count < 1:
        raise ValueError(f"local rank {local_rank}: no CUDA device is visible")
    if local_rank < device_count:
        return local_rank
    if device_count == 1:
        return 0  # bound to one GPU of its own (srun --gpus-per-task=1 / per-task CUDA_VISIBLE_DEVICES)
    raise ValueError(
        f"local rank {local_rank} has no GPU: {device_count} visible to this process "
        "(more processes per node than GPUs? with srun, --gpus-per-task=1 gives each task its own)"
    )


def init_distributed(backend: str = "auto", timeout_s: int = 300) -> DistInfo:
    """Initialise the default process group if the launch has several ranks."""
    env = resolve_launch_env()
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError(
            "parallel.backend='nccl' but no CUDA device is visible; use 'gloo' or 'auto'"
        )
    if use_cuda:
        index = choose_cuda_device(env.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
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
    """True on global rank 0, and in a process without a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args: object) -> None:
    """print (flushed) on global rank 0 only: the user-facing lines a multi-rank run says once."""
    if is_rank0():
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------
# collectives: every tensor on the trainer's device

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def group_backend(group: dist.ProcessGroup) -> str:
    """The backend name of ``group`` ("nccl", "gloo", ...)."""
    return str(dist.get_backend(group))


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" without an index means the current device: equal to any cuda:<i> for this check.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_collective_tensors(
    tensors: Sequence[torch.Tensor], device: torch.device, backend: str, what: str
) -> None:
    """Every tensor of a collective must be on ``device`` (the trainer's), and NCCL needs CUDA.

    A CPU tensor handed to an NCCL group fails only on a GPU machine, after the work before it
    (a whole sampling run, a training step): this check makes the mistake visible on CPU runs too,
    where ``device`` is cpu and every call site still has to pass the device it runs on.
    """
    if "nccl" in backend and device.type != "cuda":
        raise RuntimeError(
            f"{what}: the group's backend is {backend}, which takes CUDA tensors only, but the "
            f"trainer's device is {device}"
        )
    for i, t in enumerate(tensors):
        if not _same_device(t.device, device):
            raise RuntimeError(
                f"{what}: tensor {i} {tuple(t.shape)} {t.dtype} is on {t.device}, not on the "
                f"trainer's device {device} (group backend {backend})"
            )


def all_reduce(
    t: torch.Tensor, group: dist.ProcessGroup | None, device: torch.device, op: str = "sum"
) -> torch.Tensor:
    """In-place all-reduce (op sum | mean | max) of a tensor on ``device``; identity without group."""
    if group is None:
        return t
    check_collective_tensors([t], device, group_backend(group), "all_reduce")
    dist.all_reduce(t, op=_OPS[op], group=group)
    if op == "mean":
        t.div_(dist.get_world_size(group))
    return t


def all_reduce_async(
    t: torch.Tensor, group: dist.ProcessGroup, device: torch.device
) -> dist.Work | None:
    """Start a SUM all-reduce of a tensor on ``device``; returns the work handle to ``wait()`` on."""
    check_collective_tensors([t], device, group_backend(group), "all_reduce_async")
    return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True)


def all_reduce_host(
    t: torch.Tensor, group: dist.ProcessGroup | None, device: torch.device, op: str = "sum"
) -> torch.Tensor:
    """All-reduce host data (counters, flags): copied to ``device`` for the collective; returns CPU."""
    if group is None:
        return t.cpu()
    return all_reduce(t.to(device), group, device, op).cpu()


def all_reduce_scalars(
    values: Sequence[float],
    group: dist.ProcessGroup | None,
    device: torch.device,
    op: str = "mean",
) -> list[float]:
    """Reduce a few Python floats over ``group`` in float64 (identity when group is None)."""
    if group is None:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    return all_reduce_host(t, group, device, op).tolist()


def gather_rows_to_rank0(
    t: torch.Tensor,
    group: dist.ProcessGroup | None,
    device: torch.device,
    max_chunk_bytes: int = 256 << 20,
) -> torch.Tensor | None:
    """[N, ...] host rows on every rank (same N and shape) -> [W*N, ...] on CPU, in group-rank order,
    on group rank 0; None on the others.

    The rows travel through ``device`` in chunks of at most ``max_chunk_bytes`` gathered in total, so
    50K uint8 images do not need W copies of the whole set in GPU memory at once.
    """
    if group is None:
        return t.cpu()
    world, me = dist.get_world_size(group), dist.get_rank(group)
    n = t.shape[0]
    row_bytes = max(1, t[0].numel() * t.element_size()) if n else 1
    rows = max(1, max_chunk_bytes // (world * row_bytes))
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(n, 1), rows):
        local = t[start : start + rows].contiguous().to(device)
        parts = [torch.empty_like(local) for _ in range(world)]
        check_collective_tensors([local], device, group_backend(group), "gather_rows_to_rank0")
        dist.all_gather(parts, local, group=group)
        if me == 0:
            for r, part in enumerate(parts):
                per_rank[r].append(part.cpu())
    if me != 0:
        return None
    return torch.cat([torch.cat(chunks) for chunks in per_rank])


def broadcast_object(obj: Any, group: dist.ProcessGroup | None) -> Any:
    """Group rank 0's picklable ``obj`` on every rank (identity without group). torch serialises it
    into a tensor on the current CUDA device under NCCL (set by init_distributed), on CPU under gloo."""
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def all_gather_objects(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    """Every rank's picklable ``obj``, in group-rank order ([obj] without group)."""
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: dist.ProcessGroup | None) -> None:
    """dist.barrier on ``group`` (no-op without one). On NCCL it runs on the device bound at
    init_process_group(device_id=...)."""
    if group is not None:
        dist.barrier(group=group)


_RANK0_CALLS: dict[tuple[int, ...], int] = {}  # calls per group (same order on every rank)


def run_on_rank0(
    fn: Callable[[], str],
    group: dist.ProcessGroup | None,
    timeout_s: float,
    what: str,
) -> str:
    """Rank 0 of ``group`` runs ``fn`` (a long, local job: hashing a checkpoint) while the others
    wait up to ``timeout_s`` for its result string; every rank returns it.

    The others do not wait in a collective: a barrier would be bound to the group's timeout
    (parallel.timeout_s, 300 s), and rank 0 hashing tens of GB on a slow shared filesystem would
    trip it. They wait on the process group's key-value store instead (a TCPStore get with its own
    timeout), which holds no communicator and no GPU work, so the NCCL watchdog has nothing to
    time out. An exception on rank 0 is published too and re-raised on every rank as RuntimeError.
    Call on every rank of ``group``, in the same order.
    """
    if group is None:
        return fn()
    ranks = tuple(dist.get_process_group_ranks(group))
    _RANK0_CALLS[ranks] = n = _RANK0_CALLS.get(ranks, 0) + 1
    key = f"diffmoe/rank0/{','.join(map(str, ranks))}/{n}"
    # The default store is torch's own rendezvous store (a TCPStore for env:// and tcp://); torch's
    # store-based barrier uses it the same way.
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank(group) == 0:
        try:
            result = fn()
        except BaseException as e:
            store.set(key, "error:" + f"{type(e).__name__}: {e}")
            raise
        store.set(key, "ok:" + result)
        return result
    try:
        store.wait([key], datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - re-raised with what we waited for
        raise RuntimeError(f"{what}: rank 0 did not finish within {timeout_s:.0f} s ({e})") from e
    value = store.get(key).decode()
    if value.startswith("error:"):
        raise RuntimeError(f"{what} failed on rank 0: {value[len('error:') :]}")
    return value[len("ok:") :]
