"""Inference: loading a checkpoint for sampling, generation, the distributed sampling driver."""

from diffmoe_dist.inference.load import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
