"""Exponential moving average of the weights; the EMA model also carries the live MoE thresholds."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (thresholds) are copied.

    Both modules must hold the same (possibly sharded) parameters in the same order. One foreach
    lerp over all parameters and one foreach copy over the buffers (update_ema_reference: the loop).
    """
    pe, pm = [], []
    for (name_e, p_e), (name_m, p_m) in zip(ema.named_parameters(), model.named_parameters()):
        assert name_e == name_m, (name_e, name_m)
        if p_m.requires_grad:
            pe.append(p_e)
            # .to: a no-op in fp32; under DeepSpeed bf16 the module weights are bf16, the EMA fp32
            pm.append(p_m.detach().to(p_e.dtype))
    if pe:
        torch._foreach_lerp_(pe, pm, 1.0 - decay)
    be, bm = list(ema.buffers()), list(model.buffers())
    n = min(len(be), len(bm))
    if n:
        torch._foreach_copy_(be[:n], bm[:n])


@torch.no_grad()
def update_ema_reference(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """The slow, obvious reference of update_ema: one parameter at a time."""
    for (name_e, p_e), (name_m, p_m) in zip(ema.named_parameters(), model.named_parameters()):
        assert name_e == name_m, (name_e, name_m)
        if p_m.requires_grad:
            # .to: a no-op in fp32; under DeepSpeed bf16 the module weights are bf16, the EMA fp32
            p_e.lerp_(p_m.detach().to(p_e.dtype), 1.0 - decay)
    for b_e, b_m in zip(ema.buffers(), model.buffers()):
        b_e.copy_(b_m)
