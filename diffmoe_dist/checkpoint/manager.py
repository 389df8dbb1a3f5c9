"""The trainer's checkpoint manager: save (atomic, every rank), publish, keep-k, resume point, load.

Only the trainer that holds the run (its lock, trainer/runlock.py) makes one: it publishes, prunes,
and removes the ``.tmp-*`` directories of saves that died (``remove_stale_saves``). A failed write
(disk full, quota, permission) raises CheckpointWriteError on every rank with one line naming the
path and the bytes, and leaves the previous checkpoints untouched.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException

from diffmoe_dist.checkpoint.load import check_compatible, load_checkpoint, root_cause
from diffmoe_dist.checkpoint.manifest import (
    CKPT_PREFIX,
    checkpoint_meta,
    latest_verified,
    list_checkpoints,
    no_verified_checkpoint_message,
    step_of,
    verify_checkpoint,
    write_manifest,
)
from diffmoe_dist.checkpoint.state import flat_state
from diffmoe_dist.config import Config
from diffmoe_dist.fsutil import fsync_dir
from diffmoe_dist.parallel.distributed import (
    all_gather_objects,
    barrier,
    broadcast_object,
    run_on_rank0,
)

log = logging.getLogger(__name__)


class CheckpointWriteError(RuntimeError):
    """A save failed (disk full, permission, ...); the message is one line for the user."""


def _remove_published(path: Path) -> None:
    """Unpublish atomically (rename to ``.tmp-del-*``), then delete: a kill during the deletion
    leaves a ``.tmp-*`` directory (removed by the next trainer start), never a half checkpoint."""
    doomed = path.with_name(f".tmp-del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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
        state = flat_state(model, ema, optimizer)
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
        write_manifest(tmp, checkpoint_meta(self.cfg, step, self.world_size, extra))
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
        e = root_cause(e)
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
        prev = [p for p in list_checkpoints(self.root) if step_of(p) < step]
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
        older = [p for p in list_checkpoints(self.root) if step_of(p) < step]
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
