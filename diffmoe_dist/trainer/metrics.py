"""metrics.jsonl on rank 0 (one JSON object per logged step) and, when enabled, Weights & Biases.

W&B respects WANDB_MODE (e.g. offline); when it is off, a null logger keeps call sites unconditional.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from diffmoe_dist.fsutil import atomic_write_bytes


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        enabled: bool,
        use_wandb: bool = False,
        wandb_project: str = "diffmoe-dist",
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        if enabled and use_wandb:
            import wandb

            self._wandb = wandb.init(
                project=wandb_project,
                dir=str(run_dir),
                config=config,
                resume="allow",
                name=Path(run_dir).name,
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
        if self._wandb is not None:
            flat = {k: v for k, v in clean.items() if isinstance(v, (int, float))}
            self._wandb.log(flat, step=int(record.get("step", 0)))

    def truncate_after(self, step: int) -> None:
        """At every start (step = where training resumes, 0 without a checkpoint): keep each step
        <= ``step`` once, in order, and drop the rest (those steps will be redone).

        A step logged twice (by an older version, or a run that crashed before its checkpoint)
        keeps its last record, the one of the lineage that reached the checkpoint. Rewritten
        atomically, so a kill during this leaves the old file."""
        if not self.enabled or not self.path.exists():
            return
        by_step: dict[int, str] = {}
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
                s = int(rec["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut by a kill: drop it
            if s <= step:
                by_step[s] = line
        atomic_write_bytes(self.path, "".join(by_step[s] + "\n" for s in sorted(by_step)).encode())

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 2)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
