"""Flat checkpoint state: every tensor under a key that does not depend on the layout.

Every expert of every MoE layer is stored under its *global* index (``model.blocks.3.moe.experts.w1.e0007``),
and so is its optimizer state (``optim.<param>.exp_avg.e0007``); dense tensors are stored once. A rank
saves and loads exactly the experts it holds under its layout, so world 2 / ep 2 resumes at
world 4 / ep 4 or world 1 / ep 1 unchanged (resharding is a key lookup, nothing is converted).

    model.<name>   parameters and persistent buffers (routing thresholds) of the model
    ema.<name>     the same for the EMA copy
    optim.<name>.<exp_avg | exp_avg_sq | step>   AdamW state per parameter
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from diffmoe_dist.models.moe import StackedExperts


# apex FusedAdam counts steps in ``param_groups[i]["step"]`` (an int; trainer/optim.py marks it with
# ``step_in_param_groups``), not in the per-parameter state that torch AdamW uses and this module saves.
# These two move the count into the per-parameter "step" entry before a save and back after a load, so
# the checkpoint format is the same for both optimizers and bias correction continues after a resume
# instead of restarting at step 1.
def steps_to_state(optimizer: torch.optim.Optimizer) -> None:
    if not getattr(optimizer, "step_in_param_groups", False):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["step"] = torch.tensor(float(group.get("step", 0)))


def steps_from_state(optimizer: torch.optim.Optimizer) -> None:
    """The inverse of ``steps_to_state`` after a load: the group's step is its parameters' step."""
    if not getattr(optimizer, "step_in_param_groups", False):
        return
    for group in optimizer.param_groups:
        steps = [
            float(optimizer.state[p]["step"])
            for p in group["params"]
            if "step" in optimizer.state[p]
        ]
        if steps:
            group["step"] = int(max(steps))


def expert_params(model: nn.Module) -> dict[str, tuple[int, int]]:
    """param name -> (global offset, local count) for stacked-expert parameters."""
    out: dict[str, tuple[int, int]] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, StackedExperts):
            for p_name, _ in mod.named_parameters(recurse=False):
                out[f"{mod_name}.{p_name}"] = (mod.expert_offset, mod.num_experts)
    return out


def split_experts(
    key: str, t: torch.Tensor, experts: tuple[int, int] | None, out: dict[str, torch.Tensor]
) -> None:
    """out[key] = t, or out[key.eNNNN] = t[i] per local expert i (NNNN its global index)."""
    if experts is None or t.dim() == 0:
        out[key] = t
        return
    offset, n = experts
    for i in range(n):
        out[f"{key}.e{offset + i:04d}"] = t[i]


def model_state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Views of every parameter and persistent buffer, experts split by global index."""
    experts = expert_params(model)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        split_experts(prefix + name, p.data, experts.get(name), out)
    for name, b in model.named_buffers():
        if name.split(".")[-1] in _non_persistent(model):
            continue
        out[prefix + name] = b
    return out


def _non_persistent(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for mod in model.modules():
        names.update(mod._non_persistent_buffers_set)
    return names


def optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, prefix: str = "optim."
) -> dict[str, torch.Tensor]:
    """AdamW moments and step per parameter name (state created as zeros if the optimizer has none yet)."""
    experts = expert_params(model)
    out: dict[str, torch.Tensor] = {}
    steps_to_state(optimizer)  # apex FusedAdam keeps its step count in param_groups
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        st = optimizer.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for k, v in st.items():
            if torch.is_tensor(v):
                split_experts(f"{prefix}{name}.{k}", v, experts.get(name), out)
    return out


def flat_state(
    model: nn.Module | None, ema: nn.Module | None, optimizer: Any, gather: bool = True
) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds but the RNG: views into the live tensors, keyed as above."""
    # model None: only the EMA is wanted (inference loads one copy, diffmoe_dist/inference)
    state = model_state(model, "model.") if model is not None else {}
    if ema is not None:
        state.update(model_state(ema, "ema."))
    if optimizer is not None:
        # An engine whose optimizer state is not keyed by the model's parameters (DeepSpeed ZeRO:
        # flat fp32 partitions) presents it as full per-parameter tensors under the same keys
        # (``checkpoint_state``); it may also replace the "model." weights (the fp32 master copy
        # under bf16) and scatters what a load filled in (``restore_checkpoint_state``).
        custom = getattr(optimizer, "checkpoint_state", None)
        state.update(
            custom(model, gather) if custom is not None else optimizer_state(model, optimizer)
        )
    return state
