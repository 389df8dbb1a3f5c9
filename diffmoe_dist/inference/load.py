"""Loading a trained model for inference, in one place: which checkpoint, which config, which weights.

``resolve_checkpoint`` / ``resolve_with_config`` turn ``--run-dir`` or ``--checkpoint`` into a
checkpoint that verifies and the config to sample it with (the checkpoint's own, plus ``--set``);
``output_dir`` says where a reader of that checkpoint writes (``<run>/samples``; a checkpoint outside
a run directory needs ``--out``). All read-only: safe while a trainer writes the run.

``load_model`` is what ``diffmoe-sample``, ``diffmoe-eval``, the threshold sweep and the routing
study call: it builds the expert-parallel state for a sampling layout, builds ONE DiffMoE, keeps this
rank's expert slice, and loads into it the EMA or the live weights (with the MoE thresholds, which
both copies carry) from a checkpoint of either engine, through the read-only reader
(checkpoint.load_for_reading: verified files only, nothing written or deleted). The model comes back
in eval mode on ``device`` with the configured inference rule set.

Sampling layout: sampling has no global training batch, so the layout is world size x
``parallel.ep`` with pools inside a rank (parallel/layout.py ``sampling_layout``, which checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffmoe_dist.checkpoint import (
    CheckpointVanished,
    latest_verified,
    load_for_reading,
    no_verified_checkpoint_message,
    read_meta,
    require_verified,
)
from diffmoe_dist.config import Config, from_dict, merge_dicts, parse_overrides
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.parallel.layout import sampling_layout
from diffmoe_dist.parallel.parallelize import ParallelState, build_empty, build_parallel_state
from diffmoe_dist.transport.objective import model_out_channels


def resolve_checkpoint(run_dir: str | None, checkpoint: str | None) -> Path:
    """``--checkpoint`` if it verifies, else the newest checkpoint of ``--run-dir`` that verifies.

    Read-only (checkpoint.latest_verified): safe while a trainer is writing the run. A bad
    checkpoint is skipped with a warning naming the file; ValueError when none verifies.
    """
    if checkpoint:
        return require_verified(checkpoint)
    if not run_dir:
        raise ValueError("give --run-dir or --checkpoint")
    root = Path(run_dir) / "checkpoints"
    found = latest_verified(root)
    if found is None:
        raise ValueError(no_verified_checkpoint_message(root))
    return found


def output_dir(ckpt: Path, out: str | None, name: str = "samples") -> Path:
    """Where outputs go: ``--out``, else ``<run>/<name>`` for a checkpoint inside a run directory
    (``<run>/checkpoints/<step>``). A checkpoint elsewhere has no run to write into: --out is required
    (two levels up from it could be anything)."""
    if out:
        return Path(out)
    if ckpt.resolve().parent.name != "checkpoints":
        raise ValueError(
            f"--checkpoint {ckpt} is not inside a run directory (<run>/checkpoints/<step>), so there "
            f"is no <run>/{name} to write to: give --out DIR"
        )
    return ckpt.resolve().parent.parent / name


def load_sampling_config(ckpt: Path, overrides: list[str]) -> Config:
    """The checkpoint's own resolved config, with --set overrides (sample.*, moe.infer_*, parallel.*)."""
    try:
        data = read_meta(ckpt)["config"]
    except FileNotFoundError:
        raise CheckpointVanished(
            f"checkpoint {ckpt} was removed before it could be read (pruned by a live trainer?)"
        ) from None
    return from_dict(merge_dicts(data, parse_overrides(overrides))).validate()


def resolve_with_config(
    run_dir: str | None, checkpoint: str | None, overrides: list[str]
) -> tuple[Path, Config]:
    """resolve_checkpoint + load_sampling_config. With --run-dir, a checkpoint that a live trainer
    prunes in between is replaced by the newest one that verifies (a few tries)."""
    for attempt in range(5):
        ckpt = resolve_checkpoint(run_dir, checkpoint)
        try:
            return ckpt, load_sampling_config(ckpt, overrides)
        except CheckpointVanished:
            if checkpoint or attempt == 4:
                raise
    raise AssertionError("unreachable")


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
