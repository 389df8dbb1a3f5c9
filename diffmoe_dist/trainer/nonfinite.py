"""train.nonfinite: what a step with a non-finite loss or gradient norm does, the same on every rank.

    stop (default)   NonFiniteError naming the step, the values and the last checkpoint (which is
                     finite); diffmoe-train exits 3
    skip_step        the update (and EMA, thresholds) of that step is skipped; more than
                     train.nonfinite_max_skips in a row stop as above

Every rank agrees first (a MAX all-reduce of a flag), so all of them skip or all of them raise. A
checkpoint never holds non-finite weights: ``check_finite_weights`` runs before each save.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
from torch.distributed import ProcessGroup

from diffmoe_dist.config import TrainConfig
from diffmoe_dist.parallel.distributed import all_reduce, all_reduce_scalars

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The run stopped on a non-finite loss / gradient norm / weights (train.nonfinite); the message
    names the step, the values and the last checkpoint, which is finite."""

    def __init__(self, step: int, loss: float, grad_norm: float, message: str):
        super().__init__(message)
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


def last_checkpoint_name(last_saved: int) -> str:
    return f"step-{last_saved:08d}" if last_saved else "none yet"


class NonFinitePolicy:
    """train.nonfinite / nonfinite_max_skips for one run; counts the skipped steps."""

    def __init__(
        self, train: TrainConfig, group: ProcessGroup | None, device: torch.device, rank: int
    ):
        self.policy, self.max_skips = train.nonfinite, train.nonfinite_max_skips
        self.group, self.device, self.rank = group, device, rank
        self.skipped_steps = self.skips_in_row = 0

    def check(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        last_saved: int,
        applied: bool = False,
        agreed_bad: float | None = None,
    ) -> bool:
        """True when the update of ``step`` (1-based) must be skipped; raises NonFiniteError to stop.

        ``loss`` is rank-local, ``grad_norm`` global. ``agreed_bad``: the ranks' MAX of the
        non-finite flag when the caller already reduced it (the native step does, on the device).
        ``applied``: the engine has already stepped (DeepSpeed), so skipping is impossible.
        """
        if agreed_bad is None:
            bad = 0.0 if math.isfinite(loss) and math.isfinite(grad_norm) else 1.0
            agreed_bad = all_reduce_scalars([bad], self.group, self.device, "max")[0]
        if not agreed_bad:
            self.skips_in_row = 0
            return False
        what = f"non-finite loss {loss} (grad norm {grad_norm}) at step {step}"
        last = last_checkpoint_name(last_saved)
        if self.policy == "stop" or applied:
            raise NonFiniteError(
                step,
                loss,
                grad_norm,
                f"{what}; train.nonfinite={self.policy}: stopped, nothing saved after the last "
                f"checkpoint ({last}); lower train.lr (or set train.grad_clip) and rerun to resume",
            )
        self.skips_in_row += 1
        self.skipped_steps += 1
        if self.skips_in_row >= self.max_skips:
            raise NonFiniteError(
                step,
                loss,
                grad_norm,
                f"{what}: {self.skips_in_row} steps in a row skipped "
                f"(train.nonfinite_max_skips={self.max_skips}); stopped, last checkpoint {last}",
            )
        if self.rank == 0:
            log.warning("%s: update skipped (train.nonfinite=skip_step)", what)
        return True


@torch.no_grad()
def check_finite_weights(
    modules: tuple[nn.Module, ...],
    group: ProcessGroup | None,
    device: torch.device,
    step: int,
    last_saved: int,
) -> None:
    """NonFiniteError unless every weight (buffers included) of ``modules`` is finite on every rank."""
    bad = torch.zeros((), device=device)
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point():
                bad += (~torch.isfinite(t)).sum()
    all_reduce(bad, group, device)
    if bad.item():
        raise NonFiniteError(
            step,
            math.nan,
            math.nan,
            f"{int(bad.item())} non-finite weights at step {step}: not saved; the last "
            f"checkpoint ({last_checkpoint_name(last_saved)}) is the last finite one",
        )
