"""Objectives and samplers: rectified flow (path.py: t = 0 noise, t = 1 data) and DDPM (ddpm.py:
integer steps, t = 0 nearly data). objective.py is the one interface the trainer and sampler use."""

from .cfg import GuidedVelocity, cfg_velocity_fn
from .ddpm import DDPM_NUM_TIMESTEPS, DDPM_SAMPLERS, GaussianDiffusion, space_timesteps
from .loss import ModelFn, flow_matching_loss, flow_matching_mse
from .objective import (
    OBJECTIVES,
    DDPMObjective,
    FlowObjective,
    Objective,
    cfg_pool_for,
    get_objective,
    model_out_channels,
)
from .path import RectifiedFlow, expand_time
from .samplers import (
    DIFFUSION_FORMS,
    FLOW_SAMPLERS,
    SampleOutput,
    VelocityFn,
    sample,
    sample_dopri5,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
)

__all__ = [
    "DDPM_NUM_TIMESTEPS",
    "DDPM_SAMPLERS",
    "DIFFUSION_FORMS",
    "FLOW_SAMPLERS",
    "OBJECTIVES",
    "DDPMObjective",
    "FlowObjective",
    "GaussianDiffusion",
    "Objective",
    "cfg_pool_for",
    "get_objective",
    "model_out_channels",
    "space_timesteps",
    "GuidedVelocity",
    "ModelFn",
    "RectifiedFlow",
    "SampleOutput",
    "VelocityFn",
    "cfg_velocity_fn",
    "expand_time",
    "flow_matching_loss",
    "flow_matching_mse",
    "sample",
    "sample_dopri5",
    "sample_euler",
    "sample_euler_maruyama",
    "sample_heun",
]
