"""Run a function on N gloo CPU processes and bring back what each rank returned (or raised).

    results = run_distributed(fn, world_size=2, args=(...,), timeout_s=120, pg_timeout_s=30)

``fn(rank, world_size, *args)`` must be a module-level function (spawned processes import it). The
process group is initialised with ``timeout=pg_timeout_s`` so a collective that never matches fails
instead of hanging; the whole run is killed after ``timeout_s``. An exception on any rank is
re-raised in the test with that rank's traceback. Return values must be picklable (plain numbers,
dicts, lists; tensors are fine too but keep them small).
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    pg_timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        out = fn(rank, world_size, *args)
        # Bytes, not tensors: a queued tensor is a shared-memory handle that vanishes when this
        # process exits before the parent reads it.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


class DistributedError(RuntimeError):
    pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 180.0,
    pg_timeout_s: float = 30.0,
) -> list[Any]:
    """Spawn ``world_size`` processes running fn; return [result of rank 0, rank 1, ...]."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(r, world_size, port, pg_timeout_s, fn, args, results), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistributedError(
                    f"run_distributed: only ranks {sorted(got)} of {world_size} finished within "
                    f"{timeout_s}s; errors so far: {[v for ok, v in got.values() if not ok]}"
                )
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
                got[rank] = (ok, value)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
                if dead:
                    # Give the queue a moment: a process can exit right after putting its result.
                    time.sleep(0.5)
                    while not results.empty():
                        rank, ok, value = results.get()
                        got[rank] = (ok, value)
                    dead = [r for r in dead if r not in got]
                    if dead:
                        raise DistributedError(
                            f"rank(s) {dead} died without a result (exit codes "
                            f"{[procs[r].exitcode for r in dead]})"
                        ) from None
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    errors = {r: v for r, (ok, v) in got.items() if not ok}
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise DistributedError(f"{len(errors)} rank(s) failed:\n{msg}")
    import torch

    return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(world_size)]
