"""The model as if there were one device: no torch.distributed in this package."""

from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.models.moe import LocalDispatcher, MoELayer, MoEStats, StackedExperts
from diffmoe_dist.models.params import count_params

__all__ = ["DiffMoE", "LocalDispatcher", "MoELayer", "MoEStats", "StackedExperts", "count_params"]
