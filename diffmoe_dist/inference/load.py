"""Loading a trained model for inference, in one place.

``load_model`` is what ``diffmoe-sample``, ``diffmoe-eval``, ``tools/threshold_sweep.py`` and the
routing study (studies/reproduce_routing.py) call: it builds the expert-parallel state for a sampling layout, builds
ONE DiffMoE, keeps this rank's expert slice, and loads into it the EMA or the live weights (with the
MoE thresholds, which both copies carry) from a checkpoint of either engine, through the read-only
reader (checkpoint.load_for_reading: verified files only, nothing written or deleted). The model comes
back in eval mode on ``device`` with the configured inference rule set.

Sampling layout: sampling has no global training batch, so the layout is world size x
``parallel.ep`` with pools inside a rank (parallel/layout.py ``sampling_layout``, which checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffmoe_dist.checkpoint import load_for_reading
from diffmoe_dist.config import Config
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.parallel.layout import sampling_layout
from diffmoe_dist.parallel.parallelize import ParallelState, build_empty, build_parallel_state
from diffmoe_dist.transport.objective import model_out_channels


@dataclass
class LoadedModel:
    net: DiffMoE  # eval mode, on the device, this rank's experts, inference rule set
    ps: ParallelState  # its groups (world_group is None at world size 1)
    checkpoint: Path  # the checkpoint actually read (a pruned "latest" is followed)
    meta: dict[str, Any]  # that checkpoint's meta (step, config, layout, ...)


def load_model(
    cfg: Config,
    ckpt: Path,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    use_ema: bool | None = None,
    follow_latest: bool = False,
) -> LoadedModel:
    """Build the model for the sampling layout and load ``ckpt`` into it (see the module docstring).

    Collective when ``world_size > 1`` (group creation, the load): every rank calls it.
    ``use_ema`` defaults to ``sample.use_ema``. ``follow_latest``: ``ckpt`` stands for "the run's
    latest", so a checkpoint pruned by a live trainer while it is read is replaced by the newest
    one that verifies.
    """
    use_ema = cfg.sample.use_ema if use_ema is None else use_ema
    ps = build_parallel_state(cfg, world_size, rank, layout=sampling_layout(cfg, world_size))
    # uninitialised, on the device (meta -> to_empty: no random init, no CPU copy); the load fills it
    net = build_empty(cfg, ps, torch.device(device), model_out_channels(cfg))
    # The checkpoint's "ema." or "model." tensors go into the one model.
    model, ema = (None, net) if use_ema else (net, None)
    path, meta = load_for_reading(
        ckpt, cfg, model, ema, rank, world_size, ps.world_group, follow_latest
    )
    net = net.eval()
    if cfg.moe.mode != "dense":
        net.set_inference(cfg.moe.infer_mode, cfg.moe.infer_capacity, cfg.moe.gamma)
    return LoadedModel(net, ps, path, meta)
