"""The distributed sampling driver: every rank samples its share of a run, rank 0 gets them all.

Data-parallel with experts sharded as in training (``parallel.ep``): the run's sample indices that
are not on disk yet are cut into equal per-rank shares and equally sized batches (the dispatcher's
collectives need every rank in every forward; padding samples repeat the last index and are
dropped, and stay out of C_infer). Each batch goes through inference/generate.py; with a parts
directory it is saved as it finishes (inference/parts.py), so a rerun samples only what is missing.

Latent models (data.name=latents) are decoded with a local VAE, batch by batch on every rank.
Note: with the paper's pool rule a sample depends on its batch-mates, so a resumed run is a valid
sample of the same model but not bit-identical to an uninterrupted one (``independent`` is).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmoe_dist.config import Config
from diffmoe_dist.inference.capacity import CapacityMeter
from diffmoe_dist.inference.generate import generate
from diffmoe_dist.inference.images import to_uint8
from diffmoe_dist.inference.load import load_model
from diffmoe_dist.inference.parts import PartsStore, run_fingerprint
from diffmoe_dist.parallel.distributed import DistInfo, barrier, gather_rows_to_rank0
from diffmoe_dist.parallel.numerics import resolve_sample_precision, set_tf32
from diffmoe_dist.transport.objective import cfg_pool_for


def rank_share(todo: torch.Tensor, world_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the sample indices ``todo`` [T]: (indices [P], valid [P] bool).

    P = ceil(T / world_size) on every rank, so all ranks run the same number of equally sized
    batches (the dispatcher's collectives need every rank in every forward); the share is a
    contiguous slice of ``todo``, and positions past its end (padding) repeat its last index with
    valid False, to be dropped. The valid entries of all ranks cover ``todo`` exactly once.
    """
    per_rank = math.ceil(len(todo) / world_size)
    pos = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    valid = pos < len(todo)
    mine = todo[pos.clamp(max=max(len(todo) - 1, 0))] if len(todo) else pos
    return mine, valid


def sample_from_checkpoint(
    cfg: Config,
    ckpt: Path,
    labels: torch.Tensor,
    info: DistInfo,
    vae_dir: str | None = None,
    parts_dir: Path | None = None,
    follow_latest: bool = False,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """All ranks take part; rank 0 gets (uint8 NHWC images [N, H, W, C], report), others (None, report).

    One model is built and loaded (inference/load.py ``load_model``: read-only, rank 0's ``ckpt`` on
    every rank). ``follow_latest``: ``ckpt`` is "the run's latest", so when a live trainer prunes it
    while it is read, the newest checkpoint that verifies is used instead (the report names it).

    data.name=latents decodes with the VAE in ``vae_dir`` (on every rank, batch by batch). With
    ``parts_dir`` (a directory every rank can reach; inference/parts.py) each batch is saved there as
    it finishes (images, labels, its C_infer counts) and a rerun samples only the indices not yet on
    disk; C_infer is then summed over all parts, i.e. over the whole run.
    """
    W, rank = info.world_size, info.rank
    if cfg.data.name == "latents" and not vae_dir:
        raise ValueError(
            "data.name=latents: decoding the samples needs a VAE; pass --vae DIR (a local diffusers "
            "AutoencoderKL directory, e.g. sd-vae-ft-mse saved with save_pretrained)"
        )
    if cfg.sample.sampler == "dopri5" and cfg.parallel.ep > 1:
        raise ValueError(
            "sample.sampler=dopri5 takes a different number of steps per rank, which cannot "
            "drive the expert all-to-all (parallel.ep > 1); use euler, heun or sde"
        )
    vae = None
    if cfg.data.name == "latents":
        from diffmoe_dist.data.vae import decode, load_vae

        vae = load_vae(vae_dir, info.device)  # before the model: a bad path fails fast
    # one model for the sampling layout, EMA or live weights (sample.use_ema), inference rule set
    loaded = load_model(cfg, ckpt, rank, W, info.device, follow_latest=follow_latest)
    net, ps, ckpt = loaded.net, loaded.ps, loaded.checkpoint
    precision = resolve_sample_precision(cfg.sample.precision, info.device)
    set_tf32(precision != "fp32")  # TF32 for the fp32 matmuls unless exact fp32 was asked for
    n, bs = cfg.sample.num_samples, cfg.sample.batch_size
    parts = PartsStore(parts_dir) if parts_dir is not None else None
    done: set[int] = set()
    if parts is not None:
        done = parts.prepare(run_fingerprint(cfg, ckpt, labels), n, rank)
    barrier(ps.world_group)  # every rank has listed the parts before any is written
    todo = torch.tensor(sorted(set(range(n)) - done), dtype=torch.long)
    mine, valid_pos = rank_share(todo, W, rank)
    per_rank = len(mine)
    meter = CapacityMeter(cfg.model.num_classes, W, rank, info.device)
    scale = _latent_scale(cfg)
    outs = []
    for start in range(0, per_rank, bs):
        idx, valid = mine[start : start + bs], valid_pos[start : start + bs]
        meter.valid = valid  # padding samples stay out of the telemetry
        before = (list(meter.pairs), list(meter.tokens))
        x = generate(net, cfg, labels[idx], idx, info.device, meter).float()
        images = to_uint8(decode(vae, x, scale) if vae is not None else x)
        if parts is None:
            outs.append(torch.from_numpy(images))
        elif bool(valid.any()):
            pairs = [a - b for a, b in zip(meter.pairs, before[0] or [0] * len(meter.pairs))]
            tokens = [a - b for a, b in zip(meter.tokens, before[1] or [0] * len(meter.tokens))]
            keep = valid.numpy()
            parts.write(rank, idx[valid], images[keep], labels[idx[valid]], pairs, tokens)
    meter.reduce(ps.world_group)
    result = None
    if parts is not None:
        barrier(ps.world_group)  # all parts are on disk
        if rank == 0:
            result, pairs, tokens = parts.read(n)
            meter.use_totals(pairs, tokens)
    else:
        # uint8 images [per_rank, H, W, C] travel through the device (NCCL takes CUDA tensors only)
        gathered = gather_rows_to_rank0(torch.cat(outs), ps.world_group, info.device)
        result = gathered[:n].numpy() if gathered is not None else None
    report = {
        "checkpoint": str(ckpt),
        "num_samples": n,
        "resumed_samples": len(done),  # found on disk; C_infer covers them too (telemetry does not)
        "sampler": cfg.sample.sampler,
        "num_steps": cfg.sample.num_steps,
        "cfg_scale": cfg.sample.cfg_scale,
        "cfg_pool": cfg_pool_for(cfg),
        "objective": cfg.objective,
        "infer_mode": cfg.moe.infer_mode,
        "use_ema": cfg.sample.use_ema,
        "precision": precision,
        **meter.summary(),
    }
    return result, report


def _latent_scale(cfg: Config) -> float:
    """The latents' scale factor: the dataset manifest's when it is readable here, else SD's 0.18215."""
    from diffmoe_dist.data.latents import SD_VAE_SCALE_FACTOR, read_manifest

    if cfg.data.name == "latents" and cfg.data.path:
        try:
            return float(read_manifest(cfg.data.path)["scale_factor"])
        except ValueError:
            pass
    return SD_VAE_SCALE_FACTOR
