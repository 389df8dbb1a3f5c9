"""Classifier-free guidance as a velocity_fn for the samplers.

    v = v_uncond + s * (v_cond - v_uncond)       on ALL channels

v_cond = model(z, t, y), v_uncond = model(z, t, null) with null = num_classes (the learned null
label). The public DiT forward_with_cfg guides only the first 3 of 4 latent channels
(`eps, rest = model_out[:, :3], model_out[:, 3:]`), a bug copied between repositories; here every
channel is guided and tests/test_transport.py checks it on a 4-channel model.

Learned variance (objective ddpm, model output [eps (C channels), variance values (C)]):
``guided_channels=C`` guides the C eps channels and takes the variance half from the conditional
forward, as DiT's forward_with_cfg does (there the variance of the conditional half is the one the
sampler keeps). Every eps channel is guided.

cfg_scale == 1.0 is exactly the conditional velocity, so one conditional forward is made and no
unconditional pass is run (half the compute).

pool_mode: DiffMoE routes tokens over a pool of samples (every expert takes its top-k tokens of
the whole pool), so which samples share a forward changes the result.
  "joint"    one forward on the concatenated batch [z; z] with labels [y; null], [2B, ...]: the
             conditional and unconditional halves share the routing pool, as in DiT's
             forward_with_cfg; the public DiffMoE code does this on its DDPM path only.
  "separate" two forwards, first the conditional batch [B] then the unconditional batch [B]: each
             half pools only with itself, so the unconditional prediction does not depend on
             the labels of the conditional half. The public DiffMoE code's flow sampler does this.
For a dense model both modes give the same v up to float rounding. ``sample.cfg_pool: auto`` (the
default) picks the public code's choice per objective: separate under flow, joint under ddpm
(objective.py, cfg_pool_for). They differ for DiffMoE whenever moe.pool_samples does not tile the
sampling batch (then the whole batch is one pool: B samples or 2B).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from .loss import ModelFn

__all__ = ["GuidedVelocity", "cfg_velocity_fn"]

# How the conditional and unconditional halves share a routing pool (config sample.cfg_pool, besides
# "auto"): defined here once.
PoolMode = Literal["joint", "separate"]
POOL_MODES: tuple[str, ...] = get_args(PoolMode)


class GuidedVelocity:
    """velocity_fn(z [B, ...], t [B]) -> v [B, ...] with classifier-free guidance.

    Counters for compute reporting: num_calls (velocity evaluations = sampler NFE),
    num_model_forwards (model calls), num_model_samples (sum of the batch sizes the model saw).
    """

    def __init__(
        self,
        model: ModelFn,
        y: Tensor,
        cfg_scale: float,
        null_class: int,
        pool_mode: PoolMode,
        guided_channels: int | None = None,
    ) -> None:
        self.model = model
        self.guided_channels = guided_channels
        self.y = y
        self.cfg_scale = float(cfg_scale)
        self.null_class = null_class
        self.pool_mode = pool_mode
        self.y_null = torch.full_like(y, null_class)
        self.num_calls = 0
        self.num_model_forwards = 0
        self.num_model_samples = 0

    def _forward(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.num_model_forwards += 1
        self.num_model_samples += z.shape[0]
        return self.model(z, t, y)

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        batch = self.y.shape[0]
        if z.shape[0] != batch or t.shape != (batch,):
            raise ValueError(
                f"z [B, ...] and t [B] must match the labels' batch B = {batch}, "
                f"got z {tuple(z.shape)} and t {tuple(t.shape)}"
            )
        self.num_calls += 1
        if self.cfg_scale == 1.0:
            return self._forward(z, t, self.y)  # [B, ...]
        if self.pool_mode == "joint":
            out = self._forward(
                torch.cat([z, z], dim=0),  # [2B, ...]
                torch.cat([t, t], dim=0),  # [2B]
                torch.cat([self.y, self.y_null], dim=0),  # [2B]: cond half first
            )
            v_cond, v_uncond = out[:batch], out[batch:]  # [B, ...] each
        else:
            v_cond = self._forward(z, t, self.y)  # [B, ...]
            v_uncond = self._forward(z, t, self.y_null)  # [B, ...]
        g = self.guided_channels
        if g is None:  # All channels are guided (no [:, :3] split).
            return v_uncond + self.cfg_scale * (v_cond - v_uncond)
        # Learned variance: all g eps channels guided, the rest from the conditional forward.
        eps = v_uncond[:, :g] + self.cfg_scale * (v_cond[:, :g] - v_uncond[:, :g])
        return torch.cat([eps, v_cond[:, g:]], dim=1)


def cfg_velocity_fn(
    model: ModelFn,
    y: Tensor,
    cfg_scale: float,
    null_class: int,
    pool_mode: PoolMode = "joint",
    guided_channels: int | None = None,
) -> GuidedVelocity:
    """Build a guided velocity_fn for labels y [B] (long, in [0, null_class]).

    null_class is the label of the unconditional class, i.e. num_classes. y may itself contain
    null_class (unconditional samples in the batch). guided_channels: None guides every output
    channel; C guides the first C (eps) and keeps the rest (learned variance) from the conditional
    forward.
    """
    if guided_channels is not None and (
        isinstance(guided_channels, bool)
        or not isinstance(guided_channels, int)
        or guided_channels < 1
    ):
        raise ValueError(f"guided_channels must be None or an int >= 1, got {guided_channels!r}")
    if pool_mode not in POOL_MODES:
        raise ValueError(f"pool_mode must be one of {POOL_MODES}, got {pool_mode!r}")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be finite, got {cfg_scale!r}")
    if isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 1:
        raise ValueError(f"null_class must be an int >= 1 (= num_classes), got {null_class!r}")
    if y.dim() != 1 or y.dtype != torch.long:
        raise ValueError(f"y must be a 1-D long tensor [B], got shape {tuple(y.shape)}, {y.dtype}")
    if y.numel() > 0 and (int(y.min()) < 0 or int(y.max()) > null_class):
        raise ValueError(
            f"y must lie in [0, null_class = {null_class}], got min {int(y.min())}, "
            f"max {int(y.max())}"
        )
    return GuidedVelocity(model, y, cfg_scale, null_class, pool_mode, guided_channels)
