"""The on-disk format of a checkpoint, and its verification (read-only: safe against a live trainer).

Layout on disk (one directory per checkpoint)::

    <run.dir>/checkpoints/step-00001000/
        .metadata, __0_0.distcp, ...   torch.distributed.checkpoint (DCP) files, one per writing rank
        meta.json                      step, config, layout (world, ep), pool_samples, versions
        manifest.json                  written last: every file's size and sha256, plus meta

A checkpoint is published by renaming ``.tmp-step-XXXXXXXX`` once its manifest is written
(manager.py), so a directory named ``step-*`` is complete unless something damaged it afterwards:
``verify_checkpoint`` compares every file with its manifest (size, sha256).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from diffmoe_dist.config import Config, config_hash_fields
from diffmoe_dist.fsutil import atomic_write_json, fsync_dir, sha256_file

log = logging.getLogger(__name__)
CKPT_PREFIX = "step-"
FORMAT_VERSION = 1

# In-process memo of the sha256 of files verified before (readers may not leave a marker in a run
# directory, so nothing of it is on disk). Key: the file's identity and the kernel's record of its
# last change, (device, inode, size, mtime_ns, ctime_ns). Any write, truncation, replacement or
# utime sets ctime to the current time (no system call sets it back), so a file changed since it
# was hashed never matches its old key. A file whose ctime is within RACY_S of the moment it was
# hashed is not memoized (git's "racy clean" rule): on a file system with coarse timestamps a write
# in the same tick could keep the key. Published checkpoints are never rewritten, only removed;
# what the memo cannot see is damage below the file system (media errors), which a fresh process
# (every resume, every diffmoe-sample / diffmoe-eval run) hashes again.
RACY_S = 2.0
_SHA_MEMO: dict[tuple[int, ...], str] = {}
_SHA_MEMO_MAX = 4096  # entries; cleared when full (a few checkpoints of a few files each in use)


def checkpoint_meta(
    cfg: Config, step: int, world_size: int, extra: dict[str, Any] | None
) -> dict[str, Any]:
    """meta.json (and the manifest's ``meta``): what a reader needs before it loads a tensor."""
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "time": time.time(),
        "config": cfg.to_dict(),
        "model_fields": config_hash_fields(cfg),  # load.check_compatible compares these
        "pool_samples": cfg.moe.pool_samples,
        "layout": {"world_size": world_size, "ep": cfg.parallel.ep},
        "torch_version": torch.__version__,
        "extra": extra or {},
    }


def write_manifest(tmp: Path, meta: dict[str, Any]) -> None:
    """Into the unpublished ``tmp``: meta.json, then every file fsynced and hashed, then the
    manifest (atomically) and the directory entry. The caller publishes by renaming ``tmp``."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    files = {}
    for f in sorted(tmp.iterdir()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    atomic_write_json(tmp / "manifest.json", {"files": files, "meta": meta})
    fsync_dir(tmp)


def step_of(path: Path) -> int:
    """The step of a ``step-XXXXXXXX`` directory."""
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
        if full and _sha256_memo(f) != info["sha256"]:
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


def _stat_key(f: Path) -> tuple[tuple[int, ...], float]:
    st = f.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), st.st_ctime


def _sha256_memo(f: Path) -> str:
    """sha256_file(f), remembered for this process while the file provably did not change."""
    key, ctime = _stat_key(f)
    hit = _SHA_MEMO.get(key)
    if hit is not None:
        return hit
    digest = sha256_file(f)
    if time.time() - ctime > RACY_S and _stat_key(f)[0] == key:  # unchanged while it was read
        if len(_SHA_MEMO) >= _SHA_MEMO_MAX:
            _SHA_MEMO.clear()
        _SHA_MEMO[key] = digest
    return digest
