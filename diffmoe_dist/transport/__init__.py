"""Rectified-flow objective and samplers (t = 0 noise, t = 1 data; see path.py)."""

from .cfg import GuidedVelocity, cfg_velocity_fn
from .loss import ModelFn, flow_matching_loss, flow_matching_mse
from .path import RectifiedFlow, expand_time
from .samplers import (
    DIFFUSION_FORMS,
    SAMPLER_NAMES,
    SampleOutput,
    VelocityFn,
    sample,
    sample_dopri5,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
)

__all__ = [
    "DIFFUSION_FORMS",
    "SAMPLER_NAMES",
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
