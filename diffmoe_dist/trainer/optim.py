"""AdamW (torch, or apex FusedAdam where importable) and the constant-with-warmup schedule.

torch's AdamW runs fused (one kernel over all parameters, CPU and CUDA in torch >= 2.4) when
``train.fused_adamw`` is true and the parameters allow it, else the foreach (multi-tensor) path;
the single-tensor loop is never used (it also reads every step counter back with .item()).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn

from diffmoe_dist.config import TrainConfig

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer_impl == "apex":
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]

            if not torch.cuda.is_available():
                raise RuntimeError("FusedAdam needs CUDA")
            opt = FusedAdam(
                params,
                lr=cfg.lr,
                betas=cfg.betas,
                weight_decay=cfg.weight_decay,
                adam_w_mode=True,
                set_grad_none=False,  # zero_grad keeps the .grad tensors, like set_to_none=False
            )
            opt.step_in_param_groups = (
                True  # see zero_grad; checkpoint/state.py steps_to_state / steps_from_state
            )
            return opt
        except Exception as e:
            log.warning(
                "train.optimizer_impl=apex but apex FusedAdam is not usable (%s); using torch AdamW",
                e,
            )
    return torch_adamw(params, cfg)


def torch_adamw(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """Fused AdamW where the device supports it (train.fused_adamw), foreach otherwise."""
    kw = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if getattr(cfg, "fused_adamw", True):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError) as e:  # a device / dtype without a fused kernel
            log.info("fused AdamW not available (%s); using the foreach implementation", e)
    return torch.optim.AdamW(params, foreach=True, **kw)


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """Before a step's backward. Over several ranks the gradients are zeroed in place
    (set_to_none=False: DDP's bucket views and the expert buckets' hooks keep the same tensors on
    every rank). In a one-rank world nothing holds them, so they are freed instead: backward then
    hands each parameter its new gradient tensor, without zeroing every gradient and adding into it
    (two passes over 4x the dense model's parameters for DiffMoE-E16; the weights after the step
    are the same, tests/test_model.py). apex FusedAdam's ``zero_grad()`` takes no argument (it was
    built with set_grad_none=False)."""
    if getattr(optimizer, "step_in_param_groups", False):
        optimizer.zero_grad()
    else:
        optimizer.zero_grad(set_to_none=not _multi_rank())


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Constant LR (paper: 1e-4) after an optional linear warmup over ``warmup_steps`` steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
