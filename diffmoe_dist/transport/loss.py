"""Flow-matching loss for the rectified-flow path (convention: see path.py).

    z_t = t * x1 + (1 - t) * x0,   target v = x1 - x0,   loss_b = mean over non-batch dims of
    (model(z_t, t, y) - v)^2,   shape [B].

The caller (the trainer) draws x0 and t; this module never draws random numbers, so a step's loss is
a pure function of its inputs and can be reproduced across layouts and resumes. The per-sample loss
is returned unreduced so that the trainer decides how to average over the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .path import RectifiedFlow

__all__ = ["ModelFn", "flow_matching_loss", "flow_matching_mse"]

# model(x [B, C, H, W], t [B] float in [0, 1], y [B] long) -> velocity [B, C, H, W]
ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def flow_matching_mse(v_pred: Tensor, x1: Tensor, x0: Tensor) -> Tensor:
    """Per-sample MSE between a velocity prediction and the target x1 - x0.

    v_pred, x1, x0: [B, ...]. Returns [B] in float32 (or float64 if the inputs are float64): the
    squared error is accumulated in at least fp32 because a bf16 mean over 4096 elements per
    sample loses about 3 significant digits.
    """
    if v_pred.shape != x1.shape:
        raise ValueError(
            f"v_pred must have the shape of x1 {tuple(x1.shape)}, got {tuple(v_pred.shape)}"
        )
    target = RectifiedFlow.target(x1, x0)  # [B, ...]
    err = v_pred - target
    if err.dtype not in (torch.float32, torch.float64):
        err = v_pred.float() - target.float()
    return err.pow(2).flatten(1).mean(dim=1)  # [B]


def flow_matching_loss(model: ModelFn, x1: Tensor, x0: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """Per-sample rectified-flow loss [B].

    x1: data [B, C, H, W]; x0: noise of the same shape; t: [B] float in [0, 1]; y: [B] long labels
    (the null class included, label dropout is the caller's business).
    """
    if x1.dim() < 2:
        raise ValueError(f"x1 must be [B, ...] with at least 2 dims, got shape {tuple(x1.shape)}")
    batch = x1.shape[0]
    if t.shape != (batch,):
        raise ValueError(f"t must have shape [B] = [{batch}], got {tuple(t.shape)}")
    if y.shape != (batch,):
        raise ValueError(f"y must have shape [B] = [{batch}], got {tuple(y.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"t must be a floating tensor, got dtype {t.dtype}")
    z_t = RectifiedFlow.interpolate(x1, x0, t)  # [B, C, H, W]
    v_pred = model(z_t, t, y)  # [B, C, H, W]
    return flow_matching_mse(v_pred, x1, x0)
