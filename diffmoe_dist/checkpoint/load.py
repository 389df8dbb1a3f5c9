"""Loading a checkpoint into live modules, and the checks that refuse a wrong one before any tensor.

    check_compatible(path, cfg)     same model (config fields, objective), same pool (or allowed)
    load_checkpoint(...)            every rank loads its experts under the current layout (reshards)
    load_for_reading(...)           inference: verified files only, follows the latest if pruned
    precheck_resume(run_dir, cfg)   the trainer's refusal before any group work
    refuse_old_deepspeed_dir(dir)   the pre-unification DeepSpeed format (trainer/convert_ds.py)

Readers never write: nothing here creates, deletes or locks anything under ``checkpoints/``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException

from diffmoe_dist.checkpoint.manifest import (
    CheckpointVanished,
    latest_verified,
    list_checkpoints,
    read_meta,
    verify_checkpoint,
)
from diffmoe_dist.checkpoint.state import flat_state, steps_from_state
from diffmoe_dist.config import Config, config_hash_fields
from diffmoe_dist.models.moe import POOLED_MODES
from diffmoe_dist.parallel.distributed import all_gather_objects, broadcast_object, run_on_rank0

log = logging.getLogger(__name__)
OLD_DEEPSPEED_DIR = "ds_checkpoints"


def check_compatible(path: Path, cfg: Config) -> dict[str, Any]:
    """The checkpoint's meta; ValueError when it is from another objective, another model or
    another pool size."""
    meta = read_meta(path)
    mine = config_hash_fields(cfg)
    theirs = meta.get("model_fields", {})
    # The objective is in model_fields only when it is not flow (older checkpoints predate the
    # key), so it is compared on its own: a DDPM checkpoint read as flow would otherwise pass here
    # and fail later on the output layer's shape (DDPM's model also predicts the variance).
    their_obj = theirs.get("objective", meta.get("config", {}).get("objective", "flow"))
    if their_obj != cfg.objective:
        raise ValueError(
            f"checkpoint {path} was trained with objective={their_obj!r}, the config says "
            f"objective={cfg.objective!r}: the objective defines the model's output and its loss. "
            f"Set objective={their_obj} (and a sampler of it) to resume or sample this checkpoint"
        )
    diff = {
        k: (theirs.get(k), v) for k, v in mine.items() if k != "objective" and theirs.get(k) != v
    }
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} is from another model ({detail})")
    old_pool = meta.get("pool_samples")
    if old_pool != cfg.moe.pool_samples and cfg.moe.mode in POOLED_MODES:
        if not cfg.train.allow_pool_change:
            raise ValueError(
                f"checkpoint {path} was trained with moe.pool_samples={old_pool}, the config says "
                f"{cfg.moe.pool_samples}: the pool is part of the model. Set "
                "train.allow_pool_change=true to resume anyway."
            )
        log.warning(
            "resuming with moe.pool_samples %s -> %s (allowed)", old_pool, cfg.moe.pool_samples
        )
    return meta


def load_checkpoint(
    path: Path,
    cfg: Config,
    model: nn.Module | None,  # None: the EMA only (inference)
    ema: nn.Module | None,
    optimizer: Any = None,  # a torch optimizer, or see state.flat_state
    rank: int = 0,
    world_size: int = 1,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Restore ``path`` into the (already parallelized) modules; read-only; returns its meta.

    Every rank of ``group`` calls it; each loads exactly the experts it holds under the current
    layout. The RNG state is restored only when the world size is the one it was saved at.
    """
    meta = check_compatible(path, cfg)
    views = flat_state(model, ema, optimizer, gather=False)
    # Load into fresh buffers, then copy: expert views are slices of the stacked parameters.
    # Staged through the CPU: a resume never holds a second copy of model, EMA and optimizer state
    # on the GPU; each tensor is copied to its device below.
    target = {k: torch.empty_like(v, device="cpu") for k, v in views.items()}
    same_world = meta["layout"]["world_size"] == world_size
    rng_keys = _rng_keys(path, rank) if same_world else {}
    for key, current in rng_keys.items():
        target[key] = current  # CPU ByteTensors: set_rng_state takes nothing else
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=str(path), process_group=group)
    with torch.no_grad():
        for k, v in views.items():
            v.copy_(target[k])
    if optimizer is not None:
        steps_from_state(optimizer)
    restore = getattr(optimizer, "restore_checkpoint_state", None)
    if restore is not None:
        restore()  # scatter the full per-parameter tensors back into the engine's partitions
    for key in rng_keys:
        rng = target[key].cpu()
        if key.startswith("rng_cuda."):
            torch.cuda.set_rng_state(rng)
        else:
            torch.set_rng_state(rng)
    return meta


def _agree(path: Path | None, rank: int, group: dist.ProcessGroup | None) -> Path | None:
    """Rank 0's answer on every rank (ranks could otherwise see different 'latest' checkpoints)."""
    box = broadcast_object(str(path) if path is not None else None, group)
    return Path(box) if box else None


def load_for_reading(
    path: Path,
    cfg: Config,
    model: nn.Module | None,
    ema: nn.Module | None,
    rank: int = 0,
    world_size: int = 1,
    group: dist.ProcessGroup | None = None,
    follow_latest: bool = False,
    attempts: int = 5,
) -> tuple[Path, dict[str, Any]]:
    """Load a verified checkpoint for inference without writing anything; returns (path, meta).

    ``path`` comes from ``latest_verified`` or ``require_verified``; rank 0's path is used on every
    rank. A live trainer prunes old checkpoints (keep-k), so a checkpoint can vanish while it is
    read: with ``follow_latest`` (the caller asked for "the run's latest") the newest checkpoint that
    verifies is taken instead, up to ``attempts`` times; otherwise, or when none is left, ValueError
    naming the checkpoint. Bytes read come only from files that verified: published checkpoints are
    never modified, only removed.
    """
    current = _agree(path, rank, group)
    for _ in range(attempts):
        assert current is not None
        error: str | None = None
        try:
            meta = load_checkpoint(current, cfg, model, ema, None, rank, world_size, group)
        except (OSError, CheckpointException) as e:  # CheckpointException is a BaseException
            cause = root_cause(e)
            error = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        errors = [error]
        if group is not None:  # objects, not tensors: works on gloo and nccl groups alike
            errors = all_gather_objects(error, group)
        if all(e is None for e in errors):
            return current, meta
        error = next(e for e in errors if e is not None)
        # Published checkpoints never change, only get pruned: a file now missing (rmtree in
        # progress, any order) means it was removed under us, not that it is bad.
        gone = verify_checkpoint(current, full=False) is not None
        vanished = _agree(current if gone else None, rank, group)
        if vanished is None:
            raise ValueError(f"could not read checkpoint {current}: {error}")
        if not follow_latest:
            raise CheckpointVanished(
                f"checkpoint {current} was removed while it was read (pruned by the trainer?)"
            )
        log.warning("checkpoint %s was removed while it was read; taking the newest again", current)
        # rank 0 hashes while the others wait on the store (parallel.ckpt_timeout_s), not in a
        # collective bound to parallel.timeout_s
        parent = current.parent
        nxt = run_on_rank0(
            lambda parent=parent: str(latest_verified(parent) or ""),
            group,
            cfg.parallel.ckpt_timeout_s,
            f"verifying checkpoints in {parent}",
        )
        current = Path(nxt) if nxt else None
        if current is None:
            raise ValueError(
                f"checkpoint {vanished} was removed while it was read and no checkpoint under "
                f"{vanished.parent} verifies any more"
            )
    raise ValueError(
        f"checkpoints under {path.parent} kept vanishing while read ({attempts} tries)"
    )


def _rng_keys(path: Path, rank: int) -> dict[str, torch.Tensor]:
    """This rank's saved RNG states that this process can restore, with the current ones (CPU)."""
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {}
    if f"rng.rank{rank}" in stored:
        out[f"rng.rank{rank}"] = torch.get_rng_state()
    if f"rng_cuda.rank{rank}" in stored and torch.cuda.is_available():
        out[f"rng_cuda.rank{rank}"] = torch.cuda.get_rng_state()
    return out


def precheck_resume(run_dir: Path, cfg: Config) -> None:
    """Before any group work: the newest checkpoint whose manifest reads must be of this model and
    pool (check_compatible: ValueError naming the checkpoint and the numbers). Read-only, every rank;
    the full verification (sha256) and the choice of checkpoint happen at resume as before."""
    for path in list_checkpoints(Path(run_dir) / "checkpoints"):
        try:
            read_meta(path)
        except (OSError, ValueError, KeyError):
            continue  # unreadable: resume skips it (or refuses) with its own message
        check_compatible(path, cfg)
        return


def refuse_old_deepspeed_dir(run_dir: Path) -> None:
    """ValueError when ``run_dir`` holds checkpoints in the pre-unification DeepSpeed format.

    Such a run would otherwise silently start again from step 0 and append duplicate steps to
    metrics.jsonl. trainer/convert_ds.py rewrites them in the project format.
    """
    old = run_dir / OLD_DEEPSPEED_DIR
    if not (old / "latest").is_file():
        return
    tag = (old / "latest").read_text().strip()
    raise ValueError(
        f"run.dir '{run_dir}' holds DeepSpeed checkpoints in the old format ({old}, latest {tag}); "
        f"every engine now reads and writes {run_dir / 'checkpoints'}. Convert them with "
        f"`python -m diffmoe_dist.trainer.convert_ds {run_dir}` (weights, EMA, thresholds and "
        "step; Adam moments restart), "
        f"or move {old} away to start this run from step 0"
    )


def root_cause(e: BaseException) -> BaseException:
    """The exception behind a DCP CheckpointException (an OSError when one rank had one)."""
    if isinstance(e, CheckpointException):
        inner = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        return next((x for x in inner if isinstance(x, OSError)), inner[0] if inner else e)
    return e
