"""The trainer's chores in ``run.dir``, apart from checkpoints (checkpoint/) and metrics (metrics.py).

claim_run_dir      rank 0 takes the run's lock (runlock.py) and checks it can write, before
                   anything in it is written; every rank gets the same ValueError when not
PREEMPTED          written by rank 0 after a preemption checkpoint (the launcher requeues on
                   it), removed by the next start
final.json         the run's last logged losses, written atomically at the end of train()
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch.distributed import ProcessGroup

from diffmoe_dist.parallel.distributed import broadcast_object
from diffmoe_dist.trainer.runlock import RunDirLock

PREEMPTED = "PREEMPTED"


def claim_run_dir(run_dir: Path, lock: RunDirLock, rank: int, group: ProcessGroup | None) -> None:
    """Rank 0 locks ``run_dir`` and probes that it and ``checkpoints/`` are writable (fail now, not
    at the first save); ValueError on every rank when it cannot (held elsewhere, read-only)."""
    problem: str | None = None
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            for d in (run_dir, run_dir / "checkpoints"):
                d.mkdir(exist_ok=True)
                probe = d / ".write-test"
                probe.write_text("ok")
                probe.unlink()
        except ValueError as e:
            problem = str(e)
        except OSError as e:
            problem = f"run.dir '{run_dir}' is not writable: {e}"
    problem = broadcast_object(problem, group)
    if problem is not None:
        lock.release()
        raise ValueError(problem)


def mark_preempted(run_dir: Path, step: int) -> None:
    (run_dir / PREEMPTED).write_text(json.dumps({"step": step}))


def clear_preempted(run_dir: Path) -> None:
    """A predecessor's marker has been acted on (this is the requeued run): it is stale now."""
    (run_dir / PREEMPTED).unlink(missing_ok=True)


def write_final(run_dir: Path, result: dict[str, Any]) -> None:
    tmp = run_dir / "final.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, run_dir / "final.json")
