"""Datasets and the deterministic global-batch sampler.

Every dataset here has the same batch API, so the trainer does not care which one it reads::

    x, y = dataset.get_batch(indices, flip)  # indices LongTensor [n], flip BoolTensor [n]
    # x [n, channels, image_size, image_size], y [n] int64 in [0, num_classes)

``global_batch_indices`` + ``rank_slice`` decide which samples a rank reads, and the
``per_sample_*`` draws key randomness by position in the global batch, so a run's math does not
depend on the number of ranks (see ``sampler.py``).
"""

from typing import Protocol

import torch

from diffmoe_dist.data.digits import DigitsDataset
from diffmoe_dist.data.latents import (
    LatentShardDataset,
    LatentShardWriter,
    read_manifest,
    write_latent_shards,
)
from diffmoe_dist.data.sampler import (
    FLIP_STREAM,
    LABEL_DROP_STREAM,
    NOISE_STREAM,
    TIME_STREAM,
    global_batch_indices,
    per_sample_generator,
    per_sample_normal,
    per_sample_uniform,
    rank_sample_ids,
    rank_slice,
)


class BatchDataset(Protocol):
    """What the trainer needs from a dataset."""

    num_classes: int
    channels: int
    image_size: int

    def __len__(self) -> int: ...

    def get_batch(
        self, indices: torch.Tensor, flip: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


__all__ = [
    "BatchDataset",
    "DigitsDataset",
    "FLIP_STREAM",
    "LABEL_DROP_STREAM",
    "LatentShardDataset",
    "LatentShardWriter",
    "NOISE_STREAM",
    "TIME_STREAM",
    "global_batch_indices",
    "per_sample_generator",
    "per_sample_normal",
    "per_sample_uniform",
    "rank_sample_ids",
    "rank_slice",
    "read_manifest",
    "write_latent_shards",
]
