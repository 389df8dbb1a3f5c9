"""Samplers for the rectified-flow path: integrate from noise (t = 0) to data (t = 1).

Convention (path.py): z_t = t * x1 + (1 - t) * x0, velocity v = dz/dt. Every sampler takes

    velocity_fn(z [B, ...], t [B] float) -> v [B, ...]

and returns SampleOutput(x, nfe): the final state x = z at t = 1 and the number of velocity_fn
evaluations (NFE), which the project reports as compute per sample. With classifier-free guidance one
evaluation is one model forward on a 2B batch ("joint") or two forwards ("separate"), see cfg.py.

t is passed as a [B] tensor: float64 when z is float64, otherwise float32 (bf16 cannot resolve
t = 0.996 from 1.0). The state is integrated in z0's dtype.

- euler:  z += h * v(z, t_i), num_steps uniform steps, NFE = num_steps.
- heun:   explicit trapezoid (Heun's 2nd-order method), NFE = 2 * num_steps.
- dopri5: adaptive Dormand-Prince 5(4) from torchdiffeq (as SiT), NFE as counted.
- sde:    Euler-Maruyama on the SiT-style SDE with the same marginals as the ODE,
              dz = [v + D(t) * score] dt + sqrt(2 D(t)) dW,   score = -(z - t v) / (1 - t),
          with D(t) a named diffusion (SiT's names, default "sigma": D = norm * (1 - t)). The
          first num_steps - 1 steps are stochastic; the last step (to t = 1) is a deterministic
          Euler step with v, i.e. it returns the denoised mean z + (1 - t) v (SiT's "Mean" last
          step). So the score is never evaluated at t = 1, where it is singular. D * score is
          computed as -(D / (1 - t)) * (z - t v) with D / (1 - t) in closed form, so forms that
          vanish like (1 - t) have no 0/0. NFE = num_steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DIFFUSION_FORMS",
    "FLOW_SAMPLERS",
    "SampleOutput",
    "VelocityFn",
    "sample",
    "sample_dopri5",
    "sample_euler",
    "sample_euler_maruyama",
    "sample_heun",
]

# velocity_fn(z [B, ...], t [B]) -> v [B, ...]
VelocityFn = Callable[[Tensor, Tensor], Tensor]

# The flow samplers, by config name (sample.sampler under objective flow): defined here once.
FLOW_SAMPLERS = ("euler", "heun", "dopri5", "sde")
DIFFUSION_FORMS = ("constant", "sigma", "linear", "decreasing", "increasing-decreasing")


class SampleOutput(NamedTuple):
    """Final state x [B, ...] at t = 1 and the number of velocity-field evaluations."""

    x: Tensor
    nfe: int


class _Counted:
    """Wraps velocity_fn: builds the [B] time tensor, checks the output shape, counts calls."""

    def __init__(self, velocity_fn: VelocityFn, z0: Tensor) -> None:
        self.fn = velocity_fn
        self.nfe = 0
        self.batch = z0.shape[0]
        self.shape = z0.shape
        self.t_dtype = z0.dtype if z0.dtype == torch.float64 else torch.float32
        self.device = z0.device

    def time(self, t: float | Tensor) -> Tensor:
        if isinstance(t, Tensor):
            t = t.to(self.t_dtype).reshape(())
            return t.expand(self.batch).to(self.device)
        return torch.full((self.batch,), t, dtype=self.t_dtype, device=self.device)

    def __call__(self, z: Tensor, t: float | Tensor) -> Tensor:
        v = self.fn(z, self.time(t))
        self.nfe += 1
        if v.shape != self.shape:
            raise ValueError(
                f"velocity_fn must return the state's shape {tuple(self.shape)}, got {tuple(v.shape)}"
            )
        return v.to(z.dtype)


def _check_z0(z0: Tensor) -> None:
    if not isinstance(z0, Tensor) or not z0.is_floating_point() or z0.dim() < 1:
        raise ValueError("z0 must be a floating tensor [B, ...]")


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")


def _grid(num_steps: int) -> list[float]:
    # Uniform grid 0 = t_0 < ... < t_N = 1 built in float64 so t_N is exactly 1.
    return [i / num_steps for i in range(num_steps + 1)]


def sample_euler(velocity_fn: VelocityFn, z0: Tensor, num_steps: int) -> SampleOutput:
    """Explicit Euler from t = 0 to 1 on a uniform grid. NFE = num_steps."""
    _check_z0(z0)
    _check_steps(num_steps)
    f = _Counted(velocity_fn, z0)
    ts = _grid(num_steps)
    z = z0
    for i in range(num_steps):
        h = ts[i + 1] - ts[i]
        z = z + h * f(z, ts[i])
    return SampleOutput(z, f.nfe)


def sample_heun(velocity_fn: VelocityFn, z0: Tensor, num_steps: int) -> SampleOutput:
    """Heun (explicit trapezoid, 2nd order) on a uniform grid. NFE = 2 * num_steps.

    The corrector is kept on the last step too: unlike an eps/x0 model at sigma = 0, the velocity
    is finite at t = 1 (the model is trained on t in [0, 1]).
    """
    _check_z0(z0)
    _check_steps(num_steps)
    f = _Counted(velocity_fn, z0)
    ts = _grid(num_steps)
    z = z0
    for i in range(num_steps):
        h = ts[i + 1] - ts[i]
        d1 = f(z, ts[i])
        z_pred = z + h * d1
        d2 = f(z_pred, ts[i + 1])
        z = z + (0.5 * h) * (d1 + d2)
    return SampleOutput(z, f.nfe)


def sample_dopri5(
    velocity_fn: VelocityFn, z0: Tensor, atol: float = 1e-6, rtol: float = 1e-3
) -> SampleOutput:
    """Adaptive Dormand-Prince 5(4) (torchdiffeq.odeint) from t = 0 to 1.

    Defaults follow SiT's ODE sampler (atol 1e-6, rtol 1e-3). NFE depends on the field.
    """
    _check_z0(z0)
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if not (isinstance(tol, int | float) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"{name} must be a finite float > 0, got {tol!r}")
    try:
        from torchdiffeq import odeint
    except ImportError as e:  # a dependency of the package; say what is missing
        raise ImportError("sample_dopri5 needs torchdiffeq: pip install torchdiffeq") from e
    f = _Counted(velocity_fn, z0)
    t_span = torch.tensor([0.0, 1.0], dtype=f.t_dtype, device=z0.device)
    # odeint calls func(t_scalar, z); the state stays in z0's dtype.
    traj = odeint(lambda t, z: f(z, t), z0, t_span, method="dopri5", atol=atol, rtol=rtol)
    return SampleOutput(traj[-1], f.nfe)


def _diffusion_over_sigma(form: str, norm: float, t: float) -> tuple[float, float]:
    """(D(t), D(t) / (1 - t)) for a named diffusion form, t < 1, closed form where D ~ (1 - t)."""
    if form in ("sigma", "linear"):  # identical on this path: sigma(t) = 1 - t
        return norm * (1.0 - t), norm
    if form == "constant":
        return norm, norm / (1.0 - t)
    if form == "decreasing":
        d = 0.25 * (norm * math.cos(math.pi * t) + 1.0) ** 2
        return d, d / (1.0 - t)
    if form == "increasing-decreasing":
        d = norm * math.sin(math.pi * t) ** 2
        return d, d / (1.0 - t)
    raise ValueError(f"diffusion must be one of {DIFFUSION_FORMS}, got {form!r}")


def sample_euler_maruyama(
    velocity_fn: VelocityFn,
    z0: Tensor,
    num_steps: int,
    diffusion: str = "sigma",
    diffusion_norm: float = 1.0,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Euler-Maruyama on dz = [v + D score] dt + sqrt(2 D) dW, last step deterministic (see top).

    diffusion: one of DIFFUSION_FORMS (SiT's names and formulas for D(t)); diffusion_norm scales it.
    generator: drives the Brownian increments (on z0's device); None uses the global RNG.
    NFE = num_steps.
    """
    _check_z0(z0)
    _check_steps(num_steps)
    if diffusion not in DIFFUSION_FORMS:
        raise ValueError(f"diffusion must be one of {DIFFUSION_FORMS}, got {diffusion!r}")
    if not (math.isfinite(diffusion_norm) and diffusion_norm >= 0):
        raise ValueError(f"diffusion_norm must be finite and >= 0, got {diffusion_norm!r}")
    f = _Counted(velocity_fn, z0)
    ts = _grid(num_steps)
    z = z0
    for i in range(num_steps - 1):
        t, h = ts[i], ts[i + 1] - ts[i]
        v = f(z, t)
        d, d_over_sigma = _diffusion_over_sigma(diffusion, diffusion_norm, t)
        # D * score = -(D / (1 - t)) * (z - t v): the noise estimate pulled out, no 0/0.
        drift = v - d_over_sigma * (z - t * v)
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        z = z + h * drift + math.sqrt(2.0 * d * h) * noise
    # Last step to t = 1: deterministic Euler with v = the denoised mean z + (1 - t) v.
    t_last = ts[num_steps - 1]
    z = z + (1.0 - t_last) * f(z, t_last)
    return SampleOutput(z, f.nfe)


def sample(name: str, velocity_fn: VelocityFn, z0: Tensor, **kwargs: object) -> SampleOutput:
    """Dispatch by name: "euler" | "heun" (num_steps), "dopri5" (atol, rtol), "sde" (num_steps,
    diffusion, diffusion_norm, generator)."""
    samplers: dict[str, Callable[..., SampleOutput]] = {
        "euler": sample_euler,
        "heun": sample_heun,
        "dopri5": sample_dopri5,
        "sde": sample_euler_maruyama,
    }
    if name not in samplers:
        raise ValueError(f"sampler name must be one of {FLOW_SAMPLERS}, got {name!r}")
    return samplers[name](velocity_fn, z0, **kwargs)
