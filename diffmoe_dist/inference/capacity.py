"""C_infer of a sampling run: processed (token, expert) pairs / tokens, per MoE layer and averaged.

The counting itself is the expert telemetry's (diffmoe_dist/telemetry.py owns every counter); this
is sampling's view of it: padding samples left out, one packed all-reduce over the ranks, and the
totals of a resumed run (summed over the parts on disk, inference/parts.py) in place of this
process's counts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.telemetry import ExpertTelemetry


class CapacityMeter:
    """Sampling's view of the expert telemetry (diffmoe_dist/telemetry.py owns every counter).

    C_infer per MoE layer = (token, expert) pairs / tokens over every forward of the run, of the
    kept samples: set ``valid`` [B] before a batch to leave its padding samples out. ``reduce`` is
    the telemetry's one packed all-reduce; ``use_totals`` replaces the counts by those summed over
    the parts on disk (a resumed run).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        world_size: int = 1,
        rank: int = 0,
        device: torch.device | None = None,
    ) -> None:
        # num_classes None: taken from the model at the first forward (model.num_classes)
        self._shape = (world_size, rank)
        self.telemetry: ExpertTelemetry | None = (
            ExpertTelemetry(num_classes, world_size, rank) if num_classes is not None else None
        )
        self.valid: torch.Tensor | None = None
        self.device = device
        self._totals: tuple[list[int], list[int]] | None = None

    def _sizes(self, col: int) -> list[int]:
        if self.telemetry is None:
            return []
        return [int(v) for v in self.telemetry.sizes[:, col].tolist()]

    @property
    def pairs(self) -> list[int]:
        return self._sizes(0)

    @property
    def tokens(self) -> list[int]:
        return self._sizes(1)

    def add(self, model: DiffMoE, t: torch.Tensor, y: torch.Tensor) -> None:
        if self.telemetry is None:
            self.telemetry = ExpertTelemetry(model.num_classes, *self._shape)
        self.telemetry.add(model.moe_stats(), t, y, self.valid)

    def reduce(self, group: dist.ProcessGroup | None) -> None:
        if self.telemetry is not None:
            self.telemetry.reduce(group, self.device)  # one packed all-reduce, every rank

    def use_totals(self, pairs: list[int], tokens: list[int]) -> None:
        self._totals = (pairs, tokens)

    def summary(self) -> dict[str, Any]:
        pairs, tokens = self._totals or (self.pairs, self.tokens)
        per = [p / max(n, 1) for p, n in zip(pairs, tokens)]
        out = {"c_infer_per_layer": per, "c_infer": (sum(per) / len(per)) if per else 1.0}
        if self.telemetry is not None:
            out["telemetry"] = self.telemetry.summary()
        return out
