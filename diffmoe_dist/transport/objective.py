"""The one interface through which the trainer and the sampler use an objective (config ``objective``).

    obj = get_objective(cfg.objective)            # "flow" | "ddpm"
    t = obj.time_from_uniform(u)                  # u [B] ~ U[0, 1) from the TIME_STREAM draws
    z = obj.noisy(x1, x0, t)                      # x1 data, x0 noise ~ N(0, I), [B, C, H, W]
    out = model(z, obj.model_time(t), y)          # [B, obj.out_channels(C), H, W]
    terms = obj.losses(out, x1, x0, z, t)         # per-sample [B]; terms[obj.loss_key] is the loss
    x = obj.sample(name, guided_fn, noise, num_steps, generator).x

Only this package knows what an objective is. flow: rectified flow (path.py; t float in [0, 1],
t = 0 noise, t = 1 data, model output = velocity). ddpm: ddpm.py (t integer in {0..999}, t = 0
nearly data, model output = [eps, variance values], 2C channels).

``flow_time(t)`` maps any objective's t to the flow convention (0 noise, 1 data) for telemetry.
``default_cfg_pool``: what the public DiffMoE code does when ``sample.cfg_pool: auto`` (see cfg.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from .ddpm import DDPM_NUM_TIMESTEPS, DDPM_SAMPLERS, GaussianDiffusion
from .loss import flow_matching_mse
from .path import RectifiedFlow
from .samplers import FLOW_SAMPLERS, SampleOutput, VelocityFn
from .samplers import sample as sample_flow

if TYPE_CHECKING:
    from diffmoe_dist.config import Config

__all__ = [
    "OBJECTIVES",
    "DDPMObjective",
    "FlowObjective",
    "Objective",
    "cfg_pool_for",
    "get_objective",
    "model_out_channels",
]

OBJECTIVES = ("flow", "ddpm")  # config key `objective`; the samplers of each: samplers.py, ddpm.py


class Objective(Protocol):
    name: str
    loss_key: str  # the metrics key of the objective's loss
    metric_keys: tuple[str, ...]  # every per-sample term losses() returns (loss_key first)
    samplers: tuple[str, ...]
    default_cfg_pool: str

    def out_channels(self, in_channels: int) -> int: ...
    def guided_channels(self, in_channels: int) -> int | None: ...
    def time_from_uniform(self, u: Tensor) -> Tensor: ...
    def model_time(self, t: Tensor) -> Tensor: ...
    def flow_time(self, t: Tensor) -> Tensor: ...
    def noisy(self, x1: Tensor, x0: Tensor, t: Tensor) -> Tensor: ...
    def losses(
        self, out: Tensor, x1: Tensor, x0: Tensor, z: Tensor, t: Tensor
    ) -> dict[str, Tensor]: ...
    def sample(
        self,
        name: str,
        model_fn: VelocityFn,
        noise: Tensor,
        num_steps: int,
        generator: torch.Generator | None = None,
    ) -> SampleOutput: ...


class FlowObjective:
    """Rectified flow (path.py): velocity target x1 - x0, MSE; raw t in [0, 1] into the model."""

    name = "flow"
    loss_key = "flow_loss"
    metric_keys = ("flow_loss",)
    samplers = FLOW_SAMPLERS
    # The public DiffMoE code's flow sampler runs the conditional and unconditional halves as two
    # forwards, i.e. two separate routing pools.
    default_cfg_pool = "separate"

    def out_channels(self, in_channels: int) -> int:
        return in_channels

    def guided_channels(self, in_channels: int) -> int | None:
        return None  # every output channel is velocity: guide all

    def time_from_uniform(self, u: Tensor) -> Tensor:
        return u

    def model_time(self, t: Tensor) -> Tensor:
        return t

    def flow_time(self, t: Tensor) -> Tensor:
        return t

    def noisy(self, x1: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        return RectifiedFlow.interpolate(x1, x0, t)

    def losses(
        self, out: Tensor, x1: Tensor, x0: Tensor, z: Tensor, t: Tensor
    ) -> dict[str, Tensor]:
        return {"flow_loss": flow_matching_mse(out, x1, x0)}

    def sample(
        self,
        name: str,
        model_fn: VelocityFn,
        noise: Tensor,
        num_steps: int,
        generator: torch.Generator | None = None,
    ) -> SampleOutput:
        if name not in FLOW_SAMPLERS:
            raise ValueError(
                f"sample.sampler={name!r} is not a flow sampler (objective 'flow': {FLOW_SAMPLERS})"
            )
        kw: dict[str, object] = {} if name == "dopri5" else {"num_steps": num_steps}
        if name == "sde":
            kw["generator"] = generator
        return sample_flow(name, model_fn, noise, **kw)


class DDPMObjective:
    """DDPM with learned variance and the hybrid loss (ddpm.py), 1000 linear-beta steps."""

    name = "ddpm"
    loss_key = "ddpm_loss"
    metric_keys = ("ddpm_loss", "mse", "vb")
    samplers = DDPM_SAMPLERS
    # The public DiffMoE code's DDPM path (DiT's sample.py) concatenates [z; z] with labels
    # [y; null] and runs ONE forward, so both halves share a routing pool.
    default_cfg_pool = "joint"

    def __init__(self, num_timesteps: int = DDPM_NUM_TIMESTEPS) -> None:
        self.diffusion = GaussianDiffusion.linear(num_timesteps)
        self.num_timesteps = num_timesteps

    def out_channels(self, in_channels: int) -> int:
        return 2 * in_channels  # [eps, variance values]

    def guided_channels(self, in_channels: int) -> int | None:
        # Guidance on every eps channel; the variance half comes from the conditional forward (DiT).
        return in_channels

    def time_from_uniform(self, u: Tensor) -> Tensor:
        # floor(u * T): uniform over {0, ..., T - 1}; the clamp guards float rounding of u near 1.
        return (u.double() * self.num_timesteps).floor().long().clamp_(0, self.num_timesteps - 1)

    def model_time(self, t: Tensor) -> Tensor:
        return t  # the integer step itself (training uses the full process)

    def flow_time(self, t: Tensor) -> Tensor:
        return 1.0 - (t.double() + 0.5) / self.num_timesteps  # step 0 ~ data = flow t near 1

    def noisy(self, x1: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        return self.diffusion.q_sample(x1, t, x0)

    def losses(
        self, out: Tensor, x1: Tensor, x0: Tensor, z: Tensor, t: Tensor
    ) -> dict[str, Tensor]:
        terms = self.diffusion.training_losses(out, x1, z, t, x0)
        return {"ddpm_loss": terms["loss"], "mse": terms["mse"], "vb": terms["vb"]}

    def sample(
        self,
        name: str,
        model_fn: VelocityFn,
        noise: Tensor,
        num_steps: int,
        generator: torch.Generator | None = None,
    ) -> SampleOutput:
        if name not in DDPM_SAMPLERS:
            raise ValueError(
                f"sample.sampler={name!r} is not a DDPM sampler (objective 'ddpm': {DDPM_SAMPLERS})"
            )
        process = self.diffusion.respaced(num_steps)
        if name == "ddpm":
            x, nfe = process.sample_ancestral(model_fn, noise, generator)
        else:
            x, nfe = process.sample_ddim(model_fn, noise)
        return SampleOutput(x, nfe)


def get_objective(name: str) -> Objective:
    if name == "flow":
        return FlowObjective()
    if name == "ddpm":
        return DDPMObjective()
    raise ValueError(f"config key 'objective' = {name!r}; expected one of {', '.join(OBJECTIVES)}")


def model_out_channels(cfg: Config) -> int:
    """Output channels of the model that ``cfg`` trains (2C under ddpm: learned variance)."""
    return get_objective(cfg.objective).out_channels(cfg.model.in_channels)


def cfg_pool_for(cfg: Config) -> str:
    """sample.cfg_pool, with ``auto`` resolved to what the public code does for the objective."""
    pool = cfg.sample.cfg_pool
    return get_objective(cfg.objective).default_cfg_pool if pool == "auto" else pool
