"""Sharded, atomic, verified checkpoints that can be resumed on another world size or ep degree.

Layout on disk (one directory per checkpoint)::

    <run.dir>/checkpoints/step-00001000/
        .metadata, __0_0.distcp, ...   torch.distributed.checkpoint (DCP) files, one per writing rank
        meta.json                      step, config, layout (world, ep), pool_samples, versions
        manifest.json                  written last: every file's size and sha256, plus meta

How it stays consistent:
- Every expert of every MoE layer is stored under its *global* index (``...experts.w1.e0007``), and so
  is its optimizer state; dense tensors are stored once. A rank loads exactly the experts it holds
  under the new layout, so world 2 / ep 2 resumes at world 4 / ep 4 or world 1 / ep 1 unchanged.
- All ranks write into ``.tmp-step-XXXXXXXX``; rank 0 then writes the manifest and renames the
  directory to ``step-XXXXXXXX`` (a rename is atomic): a checkpoint is complete or not there at all.
- On load, the newest checkpoint is verified against its manifest (every file's size and sha256); a
  truncated or corrupted one is skipped with a warning naming the file, and the previous good one is
  used. Training resume and every reader (sample, eval, sweep, studies) go through the same
  ``latest_verified``.

Readers never write: ``latest_verified`` / ``load_for_reading`` open files read-only and never
create, delete or lock anything under ``checkpoints/``, so sampling a live run cannot disturb the
trainer. Only the trainer that holds the run (its lock, trainer/trainer.py) writes there: it
publishes, prunes, and removes the ``.tmp-*`` directories of saves that died
(``CheckpointManager.remove_stale_saves``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException

from diffmoe_dist.config import Config, config_hash_fields
from diffmoe_dist.fsutil import atomic_write_json, fsync_dir, sha256_file
from diffmoe_dist.models.moe import StackedExperts
from diffmoe_dist.parallel.distributed import (
    all_gather_objects,
    barrier,
    broadcast_object,
    run_on_rank0,
)
from diffmoe_dist.trainer.optim import steps_from_state, steps_to_state

log = logging.getLogger(__name__)
CKPT_PREFIX = "step-"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# flat state: every tensor under a layout-independent key


def expert_params(model: nn.Module) -> dict[str, tuple[int, int]]:
    """param name -> (global offset, local count) for stacked-expert parameters."""
    out: dict[str, tuple[int, int]] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, StackedExperts):
            for p_name, _ in mod.named_parameters(recurse=False):
                out[f"{mod_name}.{p_name}"] = (mod.expert_offset, mod.num_experts)
    return out


def split_experts(
    key: str, t: torch.Tensor, experts: tuple[int, int] | None, out: dict[str, torch.Tensor]
) -> None:
    if experts is None or t.dim() == 0:
        out[key] = t
        return
    offset, n = experts
    for i in range(n):
        out[f"{key}.e{offset + i:04d}"] = t[i]


def model_state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Views of every parameter and persistent buffer, experts split by global index."""
    experts = expert_params(model)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        split_experts(prefix + name, p.data, experts.get(name), out)
    for name, b in model.named_buffers():
        if name.split(".")[-1] in _non_persistent(model):
            continue
        out[prefix + name] = b
    return out


def _non_persistent(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for mod in model.modules():
        names.update(mod._non_persistent_buffers_set)
    return names


def optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, prefix: str = "optim."
) -> dict[str, torch.Tensor]:
    """AdamW moments and step per parameter name (state created as zeros if the optimizer has none yet)."""
    experts = expert_params(model)
    out: dict[str, torch.Tensor] = {}
    steps_to_state(optimizer)  # apex FusedAdam keeps its step count in param_groups
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        st = optimizer.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for k, v in st.items():
            if torch.is_tensor(v):
                split_experts(f"{prefix}{name}.{k}", v, experts.get(name), out)
    return out


# ----------------------------------------------------------------------------------------------------
# files


def _step_of(path: Path) -> int:
    return int(path.name[len(CKPT_PREFIX) :])


def list_checkpoints(ckpt_root: str | os.PathLike[str]) -> list[Path]:
    """Published checkpoint directories, newest first (by step)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(CKPT_PREFIX):
            try:
                found.append((int(d.name[len(CKPT_PREFIX) :]), d))
            except ValueError:
                continue
    return [d for _, d in sorted(found, reverse=True)]


def verify_checkpoint(path: Path, full: bool = True) -> str | None:
    """None when ``path`` matches its manifest, else a message naming the bad file.

    A checkpoint removed while it is checked (a live trainer pruning it) is reported, not raised.
    """
    try:
        return _verify(path, full)
    except FileNotFoundError as e:
        return f"{e.filename or path} is missing (removed while it was checked)"


def _verify(path: Path, full: bool) -> str | None:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (incomplete checkpoint)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{manifest_path} is unreadable: {e}"
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != info["size"]:
            return f"{f} has {size} bytes, manifest says {info['size']} (truncated?)"
        if full and sha256_file(f) != info["sha256"]:
            return f"{f} does not match its sha256 in the manifest (corrupted)"
    return None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())["meta"]


def _warn_skipped(path: Path, problem: str) -> None:
    log.warning("skipping checkpoint %s: %s", path, problem)
    warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=3)


class CheckpointVanished(ValueError):
    """A checkpoint was removed while it was being read (keep-k pruning by a live trainer)."""


def latest_verified(ckpt_root: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint under ``ckpt_root`` (a run's ``checkpoints/``) that matches its manifest.

    Read-only: never writes, deletes or locks anything, so it is safe against a live trainer. A bad
    checkpoint (missing manifest, a file truncated or with another sha256) is skipped with a warning
    naming the file and the previous one is tried; None when no checkpoint verifies. One process:
    with several ranks, rank 0 decides and broadcasts (``load_for_reading`` does).
    """
    for _ in range(5):
        vanished = False
        for path in list_checkpoints(ckpt_root):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            if path.exists():
                _warn_skipped(path, problem)
            else:  # pruned by a live trainer while we looked: not bad, and a newer one exists
                vanished = True
        if not vanished:
            return None
    return None


def require_verified(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a checkpoint that matches its manifest, else ValueError naming the bad file."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ValueError(f"checkpoint '{path}' does not verify: {problem}")
    return path


def no_verified_checkpoint_message(ckpt_root: str | os.PathLike[str]) -> str:
    """Why ``latest_verified`` found nothing: no checkpoint at all, or each one's problem."""
    found = list_checkpoints(ckpt_root)
    if not found:
        return f"no checkpoint under '{ckpt_root}'"
    bad = "; ".join(f"{p.name}: {verify_checkpoint(p) or 'ok now'}" for p in found)
    return f"no checkpoint under '{ckpt_root}' verifies ({bad})"


def check_compatible(path: Path, cfg: Config) -> dict[str, Any]:
    """The checkpoint's meta; ValueError when it is from another model or another pool size."""
    meta = read_meta(path)
    mine = config_hash_fields(cfg)
    theirs = meta.get("model_fields", {})
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} is from another model ({detail})")
    old_pool = meta.get("pool_samples")
    if old_pool != cfg.moe.pool_samples and cfg.moe.mode in ("diffmoe", "tc"):
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


def _state(
    model: nn.Module | None, ema: nn.Module | None, optimizer: Any, gather: bool = True
) -> dict[str, torch.Tensor]:
    # model None: only the EMA is wanted (inference loads one copy, diffmoe_dist/inference)
    state = model_state(model, "model.") if model is not None else {}
    if ema is not None:
        state.update(model_state(ema, "ema."))
    if optimizer is not None:
        # An engine whose optimizer state is not keyed by the model's parameters (DeepSpeed ZeRO:
        # flat fp32 partitions) presents it as full per-parameter tensors under the same keys
        # (``checkpoint_state``); it may also replace the "model." weights (the fp32 master copy
        # under bf16) and scatters what a load filled in (``restore_checkpoint_state``).
        custom = getattr(optimizer, "checkpoint_state", None)
        state.update(
            custom(model, gather) if custom is not None else optimizer_state(model, optimizer)
        )
    return state


def load_checkpoint(
    path: Path,
    cfg: Config,
    model: nn.Module | None,  # None: the EMA only (inference)
    ema: nn.Module | None,
    optimizer: Any = None,  # a torch optimizer, or see _state
    rank: int = 0,
    world_size: int = 1,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Restore ``path`` into the (already parallelized) modules; read-only; returns its meta.

    Every rank of ``group`` calls it; each loads exactly the experts it holds under the current
    layout. The RNG state is restored only when the world size is the one it was saved at.
    """
    meta = check_compatible(path, cfg)
    views = _state(model, ema, optimizer, gather=False)
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
            cause = _root_cause(e)
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


OLD_DEEPSPEED_DIR = "ds_checkpoints"


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


# ----------------------------------------------------------------------------------------------------
# manager


class CheckpointWriteError(RuntimeError):
    """A save failed (disk full, permission, ...); the message is one line for the user."""


def _remove_published(path: Path) -> None:
    """Unpublish atomically (rename to ``.tmp-del-*``), then delete: a kill during the deletion
    leaves a ``.tmp-*`` directory (removed by the next trainer start), never a half checkpoint."""
    doomed = path.with_name(f".tmp-del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _root_cause(e: BaseException) -> BaseException:
    """The exception behind a DCP CheckpointException (an OSError when one rank had one)."""
    if isinstance(e, CheckpointException):
        inner = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        return next((x for x in inner if isinstance(x, OSError)), inner[0] if inner else e)
    return e


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB ({n} bytes)" if n >= 0 else "unknown"


class CheckpointManager:
    """Saves and restores {model, ema, optimizer, thresholds (buffers), step, rng, config}."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        cfg: Config,
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None,
        keep: int = 3,
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg, self.rank, self.world_size, self.group, self.keep = (
            cfg,
            rank,
            world_size,
            group,
            keep,
        )
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        self._barrier()

    def remove_stale_saves(self) -> None:
        """Rank 0 deletes ``.tmp-*`` saves that died half-way. Only the trainer that holds the run's
        lock may call this: a reader doing it would delete a live trainer's checkpoint in progress."""
        if self.rank == 0:
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()

    def _barrier(self) -> None:
        barrier(self.group)

    def save(
        self,
        step: int,
        model: nn.Module,
        ema: nn.Module | None,
        optimizer: Any,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write ``step-XXXXXXXX`` atomically (every rank calls it).

        A write that fails (disk full, quota, file-size limit, permission, read-only file system)
        raises CheckpointWriteError on every rank with one line naming the path and the bytes
        needed or the permission; the half-written ``.tmp-*`` is removed and the previous
        checkpoints are untouched (nothing is pruned before a new one is published), so the run
        resumes from them once the cause is fixed.
        """
        name = f"{CKPT_PREFIX}{step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        state = _state(model, ema, optimizer)
        state[f"rng.rank{self.rank}"] = torch.get_rng_state()
        if torch.cuda.is_available():
            state[f"rng_cuda.rank{self.rank}"] = torch.cuda.get_rng_state()  # this rank's device
        need = self._bytes_needed(state)
        error: str | None = None
        if self.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                error = self._failed(e, tmp, step, need)
        self._raise_agreed(error, tmp)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DCP warns when no process group exists
                dcp.save(state, checkpoint_id=str(tmp), process_group=self.group)
        except (OSError, CheckpointException) as e:  # collective: every rank gets the failure
            error = self._failed(e, tmp, step, need)
            self._raise_agreed(error, tmp)

        # Rank 0 hashes every file (tens of GB for L/XL) while the others wait on the store with
        # parallel.ckpt_timeout_s, not in a collective bound to parallel.timeout_s (run_on_rank0);
        # its result ("" or the one-line error) reaches every rank, so all return or all raise.
        def publish() -> str:
            try:
                self._publish(step, tmp, final, extra)
            except OSError as e:
                return self._failed(e, tmp, step, need)
            return ""

        error = run_on_rank0(
            publish, self.group, self.cfg.parallel.ckpt_timeout_s, f"saving checkpoint {final}"
        )
        if error:
            raise CheckpointWriteError(error)
        return final

    def _publish(self, step: int, tmp: Path, final: Path, extra: dict[str, Any] | None) -> None:
        """Rank 0: meta, manifest (sizes + sha256), fsync, atomic rename, then keep-k pruning."""
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "time": time.time(),
            "config": self.cfg.to_dict(),
            "model_fields": config_hash_fields(self.cfg),
            "pool_samples": self.cfg.moe.pool_samples,
            "layout": {"world_size": self.world_size, "ep": self.cfg.parallel.ep},
            "torch_version": torch.__version__,
            "extra": extra or {},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        atomic_write_json(tmp / "manifest.json", {"files": files, "meta": meta})
        fsync_dir(tmp)
        if final.exists():  # a damaged or abandoned checkpoint of this very step: superseded
            _remove_published(final)
        os.replace(tmp, final)  # publish: the checkpoint is now complete or absent, never half
        fsync_dir(self.root)
        self._prune(step, final)

    def _bytes_needed(self, state: dict[str, torch.Tensor]) -> int:
        """About what a checkpoint takes: the newest one's size, else this rank's tensors x world."""
        for path in list_checkpoints(self.root):
            try:
                return sum(f.stat().st_size for f in path.iterdir())
            except OSError:
                continue
        return self.world_size * sum(v.numel() * v.element_size() for v in state.values())

    def _write_error(self, e: BaseException, tmp: Path, step: int, need: int) -> str:
        """One line: what failed, where, and the bytes needed / the permission missing.

        Called after the half-written save was removed, so the free space is what a retry gets.
        torch's file writer reports a short write (disk full, ``ulimit -f``) as a RuntimeError
        without errno; then the file system's free space and the file-size limit tell which.
        """
        e = _root_cause(e)
        err = e if isinstance(e, OSError) else None
        where = Path(err.filename) if err is not None and err.filename else tmp
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = -1
        fsize = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        code = err.errno if err is not None else None
        if code is None and fsize != resource.RLIM_INFINITY:
            code = errno.EFBIG
        elif code is None and 0 <= free < need:
            code = errno.ENOSPC
        reason = os.strerror(code) if code else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        head = f"checkpoint step {step} not saved: {reason} writing {where}"
        if code in (errno.ENOSPC, errno.EDQUOT):
            head += f"; it needs about {_mb(need)}, {_mb(free)} free on that file system"
        elif code == errno.EFBIG:
            head += (
                f"; the file-size limit (ulimit -f) is {fsize} bytes, it needs about {_mb(need)}"
            )
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            head += f"; the trainer needs write permission on {self.root}"
        prev = [p for p in list_checkpoints(self.root) if _step_of(p) < step]
        tail = (
            f"the previous checkpoint {prev[0]} is intact and the run resumes from it"
            if prev
            else "no earlier checkpoint: a rerun starts from step 0"
        )
        return f"{head}; {tail} once this is fixed"

    def _failed(self, e: BaseException, tmp: Path, step: int, need: int) -> str:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
        return self._write_error(e, tmp, step, need)

    def _raise_agreed(self, error: str | None, tmp: Path) -> None:
        """Every rank learns rank 0's (or its own) error; the half-written save is removed."""
        errors = all_gather_objects(error, self.group)
        first = next((e for e in errors if e is not None), None)
        if first is None:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a failure reported by another rank
        raise CheckpointWriteError(first)

    def _prune(self, step: int, newest: Path) -> None:
        """Keep-k: remove only checkpoints older than ``newest``, once ``newest`` verifies.

        Checkpoints of later steps (left by a run that went further, e.g. damaged ones this run
        could not resume from) are never pruned: only a newer good checkpoint supersedes one, and
        a checkpoint of the same step is replaced when this run gets there. Every checkpoint this
        manager writes holds finite weights (the trainer checks before saving), so the newest
        finite checkpoint is always ``newest`` or kept.
        """
        problem = verify_checkpoint(newest, full=False)  # sha256 was computed from these bytes
        if problem is not None:
            log.warning("not pruning old checkpoints: the new one %s", problem)
            return
        older = [p for p in list_checkpoints(self.root) if _step_of(p) < step]
        for old in older[self.keep - 1 :]:
            _remove_published(old)

    def resume_point(self, allow_restart: bool) -> Path | None:
        """``latest_valid``; when checkpoints exist but none verifies, ValueError on every rank
        naming them (each one's problem), unless ``allow_restart`` (then None: start at step 0)."""
        path = self.latest_valid()
        if path is not None:
            return path
        problem: str | None = None
        if self.rank == 0 and list_checkpoints(self.root):
            problem = no_verified_checkpoint_message(self.root)
        box = [broadcast_object(problem, self.group)]
        if box[0] is None:
            return None
        if not allow_restart:
            raise ValueError(
                f"{box[0]}. Refusing to start from step 0 over them: repair or move them, or set "
                "train.allow_restart=true (they are kept until newer good checkpoints supersede them)"
            )
        if self.rank == 0:
            log.warning("%s; starting from step 0 (train.allow_restart=true)", box[0])
        return None

    def latest_valid(self) -> Path | None:
        """Rank 0 picks the newest checkpoint that matches its manifest; every rank gets the answer."""
        # Rank 0 hashes every file, which can take longer than parallel.timeout_s: the others wait
        # on the store with parallel.ckpt_timeout_s (run_on_rank0), not in a broadcast.
        choice = run_on_rank0(
            lambda: str(latest_verified(self.root) or "") if self.rank == 0 else "",
            self.group,
            self.cfg.parallel.ckpt_timeout_s,
            f"verifying checkpoints in {self.root}",
        )
        return Path(choice) if choice else None

    def check_compatible(self, path: Path) -> dict[str, Any]:
        return check_compatible(path, self.cfg)

    def load(
        self,
        path: Path,
        model: nn.Module,
        ema: nn.Module | None,
        optimizer: Any,
    ) -> dict[str, Any]:
        """Restore into the (already parallelized) modules; returns the checkpoint's meta."""
        return load_checkpoint(
            path, self.cfg, model, ema, optimizer, self.rank, self.world_size, self.group
        )
