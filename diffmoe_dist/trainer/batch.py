"""This rank's part of a step's global batch, with every per-sample draw.

The math of a run does not depend on the number of ranks: step s uses the global batch
``global_batch_indices(seed, s)`` (a fixed order), rank r takes the contiguous slice r of it, and each
sample's noise x0, time draw, label dropout and flip come from (seed, step, position in the global
batch). With train.grad_accum_steps = A the global batch is cut into A consecutive parts of G / A
samples, each laid out over the ranks as a whole batch would be, so routing pools (consecutive
samples) are the same with and without accumulation.
"""

from __future__ import annotations

import torch

from diffmoe_dist.config import Config
from diffmoe_dist.data import (
    FLIP_STREAM,
    LABEL_DROP_STREAM,
    TIME_STREAM,
    BatchDataset,
    global_batch_indices,
    per_sample_normal,
    per_sample_uniform,
    rank_sample_ids,
    rank_slice,
)
from diffmoe_dist.transport.objective import Objective


def local_batch(
    cfg: Config,
    dataset: BatchDataset,
    objective: Objective,
    step: int,
    micro: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """(x1 [B, C, H, W] data, x0 noise like x1, t [B] objective time, y [B] labels with the null
    class ``num_classes`` where dropped for CFG) of micro-batch ``micro`` of step ``step``, on
    ``device``; B = G / (A * world_size)."""
    G, A = cfg.train.global_batch_size, cfg.train.grad_accum_steps
    part = G // A
    order = global_batch_indices(len(dataset), G, cfg.train.seed, step)
    idx = rank_slice(order[micro * part : (micro + 1) * part], rank, world_size)
    ids = micro * part + rank_sample_ids(part, rank, world_size)  # positions in the global batch
    seed = cfg.train.seed
    flip = (per_sample_uniform(seed, step, ids, FLIP_STREAM) < 0.5) & cfg.data.hflip
    x1, y = dataset.get_batch(idx, flip)
    x0 = per_sample_normal(seed, step, ids, x1.shape[1:])
    t = objective.time_from_uniform(per_sample_uniform(seed, step, ids, TIME_STREAM))
    drop = per_sample_uniform(seed, step, ids, LABEL_DROP_STREAM) < cfg.model.class_dropout_prob
    y = torch.where(drop, torch.full_like(y, cfg.model.num_classes), y)  # null class for CFG
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > cfg.model.num_classes):  # host tensor
        raise ValueError(
            f"class labels must be in [0, {cfg.model.num_classes}] (model.num_classes = null "
            f"class), got min {int(y.min())}, max {int(y.max())} from the dataset"
        )
    if device.type == "cuda":  # pinned host memory: the copy does not block the host
        return tuple(v.pin_memory().to(device, non_blocking=True) for v in (x1.float(), x0, t, y))
    return tuple(v.to(device) for v in (x1.float(), x0, t, y))


def check_data_matches_model(cfg: Config, dataset: BatchDataset) -> None:
    """ValueError naming the model key when the dataset's channels / size / classes differ."""
    m = cfg.model
    for key, want, got in (
        ("in_channels", m.in_channels, dataset.channels),
        ("input_size", m.input_size, dataset.image_size),
        ("num_classes", m.num_classes, dataset.num_classes),
    ):
        if want != got:
            raise ValueError(f"model.{key}={want} but the dataset ({cfg.data.name}) has {got}")
