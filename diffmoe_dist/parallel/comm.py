"""Autograd-aware collectives for expert parallelism, each on an explicit group.

``all_to_all_single`` moves rows of a [M, D] tensor between the ranks of a group with uneven (and
zero-size) splits; its backward is the reverse all-to-all of the gradient (splits swapped). A
``ByteCounter`` callback, when given, is told the bytes sent to and received from *other* ranks
(rows that stay on this rank never touch the network), in forward and in backward.

``COMM_CLOCK`` adds up the wall time this process spends *blocked* in collectives that nothing
overlaps (gradient reduction tails, threshold and grad-norm all-reduces); the dispatcher keeps its
own ``comm_time_s``. tools/bench_step.py reads both to report exposed communication.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

# (phase "fwd" | "bwd", bytes sent to other ranks, bytes received from other ranks)
ByteCounter = Callable[[str, int, int], None]


class CommClock:
    """Seconds this process spent waiting on collectives that no computation overlapped."""

    def __init__(self) -> None:
        self.blocked_s = 0.0

    @contextmanager
    def blocking(self) -> Iterator[None]:
        """Time a synchronous collective (or a wait on an async one) as exposed communication."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.blocked_s += time.perf_counter() - t0

    def add(self, seconds: float) -> None:
        self.blocked_s += max(0.0, seconds)


COMM_CLOCK = CommClock()


def _remote_bytes(
    row_bytes: int, in_splits: list[int], out_splits: list[int], me: int
) -> tuple[int, int]:
    sent = sum(n for i, n in enumerate(in_splits) if i != me) * row_bytes
    recv = sum(n for i, n in enumerate(out_splits) if i != me) * row_bytes
    return sent, recv


def _a2a(
    x: torch.Tensor, in_splits: list[int], out_splits: list[int], group: ProcessGroup
) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(
        out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits, group=group
    )
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group, counter):  # type: ignore[override]
        ctx.in_splits, ctx.out_splits, ctx.group, ctx.counter = (
            in_splits,
            out_splits,
            group,
            counter,
        )
        if counter is not None:
            row = math.prod(x.shape[1:]) * x.element_size()
            counter("fwd", *_remote_bytes(row, in_splits, out_splits, dist.get_rank(group)))
        return _a2a(x, in_splits, out_splits, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.counter is not None:
            row = math.prod(grad.shape[1:]) * grad.element_size()
            me = dist.get_rank(ctx.group)
            ctx.counter("bwd", *_remote_bytes(row, ctx.out_splits, ctx.in_splits, me))
        return _a2a(grad, ctx.out_splits, ctx.in_splits, ctx.group), None, None, None, None


def all_to_all_single(
    x: torch.Tensor,
    in_splits: list[int],
    out_splits: list[int],
    group: ProcessGroup,
    counter: ByteCounter | None = None,
) -> torch.Tensor:
    """Rows x[sum(in_splits[:j]) : ...+in_splits[j]] go to rank j of ``group``; returns the rows
    received, ordered by source rank ([sum(out_splits), ...]). Differentiable; zero splits allowed.
    """
    if len(in_splits) != len(out_splits) or sum(in_splits) != x.shape[0]:
        raise ValueError(
            f"all_to_all_single: {x.shape[0]} rows, in_splits={in_splits} (sum {sum(in_splits)}), "
            f"out_splits={out_splits}"
        )
    return _AllToAll.apply(x, list(in_splits), list(out_splits), group, counter)


def exchange_counts(send: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """send [G, ...] long (block j for rank j) -> recv [G, ...] (block j from rank j). No autograd."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    return recv


def all_gather_rows(t: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[N, ...] on each rank of ``group`` (same N everywhere) -> [G*N, ...] in group-rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, 0)
