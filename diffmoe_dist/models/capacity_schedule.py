"""The training-capacity schedule (``moe.capacity_schedule``), as in the public DiffMoE code.

    linear:  step <= stage1_steps                 C(step) = E   (every expert takes every token)
             stage1_steps < step <= stage2_steps  C(step) = C + (E - C) (stage2 - step) / (stage2 - stage1)
             step > stage2_steps                  C(step) = C   (= moe.capacity)
    none:    C(step) = C

``step`` is the 0-based index of the optimizer step being taken (the trainer's ``self.step`` before
it is incremented), so the capacity is a pure function of the step: a resumed run continues the
schedule exactly. k = floor(S * C(step) / E) per expert and pool, and the threshold statistics (the
k-th largest predictor probability) use the same k. Only expert choice (diffmoe, ec) has a capacity.
"""

from __future__ import annotations

import dataclasses

from diffmoe_dist.config import CAPACITY_SCHEDULES, MoEConfig


def capacity_at(moe: MoEConfig, step: int) -> float:
    """Training capacity of 0-based step ``step`` under ``moe``'s schedule (see the module doc)."""
    if moe.capacity_schedule == "none":
        return moe.capacity
    if moe.capacity_schedule != "linear":
        raise ValueError(
            f"moe.capacity_schedule={moe.capacity_schedule!r}; expected one of {CAPACITY_SCHEDULES}"
        )
    E, C, s1, s2 = float(moe.num_experts), moe.capacity, moe.stage1_steps, moe.stage2_steps
    if step <= s1:
        return E
    if step <= s2:
        return C + (E - C) * (s2 - step) / (s2 - s1)
    return C


def moe_at_step(moe: MoEConfig, step: int) -> MoEConfig:
    """A copy of ``moe`` whose ``capacity`` is the scheduled one (for FLOP accounting)."""
    return dataclasses.replace(moe, capacity=capacity_at(moe, step))
