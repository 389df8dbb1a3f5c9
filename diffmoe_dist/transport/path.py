"""The rectified-flow path: how data and noise are mixed at time t, and what the model predicts.

Time convention (the whole project uses it; tested in tests/test_transport.py):

    t ~ U(0, 1), one value per sample, shape [B]
    z_t = alpha(t) * x1 + sigma(t) * x0,   alpha(t) = t,  sigma(t) = 1 - t
    x1 = data, x0 = noise ~ N(0, I)
    t = 0 is pure noise, t = 1 is pure data; samplers integrate from t = 0 to t = 1.
    The model predicts the velocity v = dz_t/dt = x1 - x0 (independent of t on each pair).
    Raw t in [0, 1] (not t * 1000) is what the model receives.

Tensors x1, x0, z, v are [B, ...] (images are [B, C, H, W]); t is [B] and is broadcast over the
non-batch dimensions. This follows the "Linear" interpolant of SiT (willisma/SiT, transport/path.py),
restated here so that nothing depends on a hidden convention.

Conversions between parameterisations, valid for any velocity v at (z, t):
    x0_hat (eps) = z - t * v                  (defined for all t in [0, 1])
    x1_hat       = z + (1 - t) * v            (defined for all t in [0, 1])
    score        = grad log p_t(z) = -x0_hat / sigma(t) = -(z - t * v) / (1 - t)   (t < 1 only)
The score form uses that x0 is standard normal: grad log p_t(z) = -E[x0 | z_t = z] / sigma(t).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RectifiedFlow", "expand_time"]


def expand_time(t: Tensor, like: Tensor, name: str = "t") -> Tensor:
    """Reshape per-sample times [B] to [B, 1, ..., 1] so they broadcast against `like` [B, ...].

    A 0-dim t is allowed and broadcast to every sample.
    """
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"{name} must have shape [B] = [{like.shape[0]}] (or be a scalar), got {tuple(t.shape)}"
        )
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


class RectifiedFlow:
    """Linear (rectified-flow) interpolant between noise x0 (t = 0) and data x1 (t = 1).

    Stateless: every method is a static function of its arguments. It is a class so that the
    path can be swapped as a unit (SiT keeps the same split between path, loss and samplers).
    """

    # ---- schedule: z_t = alpha(t) * x1 + sigma(t) * x0 ---------------------------------------
    @staticmethod
    def alpha(t: Tensor) -> Tensor:
        """Data coefficient alpha(t) = t."""
        return t

    @staticmethod
    def d_alpha(t: Tensor) -> Tensor:
        """d alpha / dt = 1."""
        return torch.ones_like(t)

    @staticmethod
    def sigma(t: Tensor) -> Tensor:
        """Noise coefficient sigma(t) = 1 - t."""
        return 1.0 - t

    @staticmethod
    def d_sigma(t: Tensor) -> Tensor:
        """d sigma / dt = -1."""
        return -torch.ones_like(t)

    # ---- training pair ------------------------------------------------------------------------
    @staticmethod
    def interpolate(x1: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """z_t = t * x1 + (1 - t) * x0. x1, x0: [B, ...]; t: [B] (or scalar). Returns [B, ...]."""
        _check_same_shape(x1, x0, "x1", "x0")
        tb = expand_time(t, x1)
        return tb * x1 + (1.0 - tb) * x0

    @staticmethod
    def target(x1: Tensor, x0: Tensor) -> Tensor:
        """Velocity target v = d z_t / dt = x1 - x0, [B, ...]."""
        _check_same_shape(x1, x0, "x1", "x0")
        return x1 - x0

    # ---- conversions from a velocity prediction ------------------------------------------------
    @staticmethod
    def velocity_to_eps(z: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """Noise estimate x0_hat = z - t * v (exact inverse of interpolate when v = x1 - x0)."""
        _check_same_shape(z, v, "z", "v")
        return z - expand_time(t, z) * v

    @staticmethod
    def velocity_to_data(z: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """Data estimate x1_hat = z + (1 - t) * v."""
        _check_same_shape(z, v, "z", "v")
        return z + (1.0 - expand_time(t, z)) * v

    @staticmethod
    def eps_to_velocity(z: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Inverse of velocity_to_eps: v = (z - eps) / t, defined for t > 0 only."""
        _check_same_shape(z, eps, "z", "eps")
        if bool((t <= 0).any()):
            raise ValueError(f"eps_to_velocity needs t > 0, got min t = {float(t.min()):.6g}")
        return (z - eps) / expand_time(t, z)

    @staticmethod
    def velocity_to_score(z: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """Score grad_z log p_t(z) = -(z - t * v) / (1 - t), defined for t < 1 only.

        Samplers that need score * diffusion should not call this near t = 1: the product has a
        finite limit for diffusions that vanish like sigma(t) (see samplers.py).
        """
        _check_same_shape(z, v, "z", "v")
        if bool((t >= 1).any()):
            raise ValueError(f"velocity_to_score needs t < 1, got max t = {float(t.max()):.6g}")
        tb = expand_time(t, z)
        return -(z - tb * v) / (1.0 - tb)

    @staticmethod
    def score_to_velocity(z: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Inverse of velocity_to_score: x0_hat = -(1 - t) * score, v = (z - x0_hat) / t (t > 0)."""
        _check_same_shape(z, score, "z", "score")
        if bool((t <= 0).any()):
            raise ValueError(f"score_to_velocity needs t > 0, got min t = {float(t.min()):.6g}")
        tb = expand_time(t, z)
        eps = -(1.0 - tb) * score
        return (z - eps) / tb
