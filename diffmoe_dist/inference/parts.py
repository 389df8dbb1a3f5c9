"""The resumable parts store of a sampling run: ``<out>/parts``.

Each finished batch of each rank is one ``part-<first index>-r<rank>.npz`` (sample indices, uint8
images [b, H, W, C], labels, and the batch's C_infer counts per MoE layer), written under a temporary
name and renamed, so a part is complete or absent. ``run.json`` holds the fingerprint of the settings
the samples depend on (``run_fingerprint``): a rerun with the same settings samples only the indices
not on disk yet, one with other settings is refused before any work (mixing them would be a sample
of no model), unless no part was written yet.

Every rank reaches the directory (a shared file system on a cluster); rank 0 alone writes run.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmoe_dist.config import Config
from diffmoe_dist.fsutil import atomic_write_json


def run_fingerprint(cfg: Config, ckpt: Path, labels: torch.Tensor) -> dict[str, Any]:
    """What the samples depend on: a rerun into the same parts directory must match it."""
    s, m = cfg.sample, cfg.moe
    return {
        "checkpoint": str(ckpt.resolve()),
        "num_samples": s.num_samples,
        "labels_sha256": hashlib.sha256(labels.to(torch.int64).numpy().tobytes()).hexdigest(),
        "sampler": s.sampler,
        "num_steps": s.num_steps,
        "cfg_scale": s.cfg_scale,
        "cfg_pool": s.cfg_pool,
        "seed": s.seed,
        "use_ema": s.use_ema,
        "infer": [m.infer_mode, m.infer_capacity, m.gamma],
        "precision": s.precision,
    }


class PartsStore:
    """``root`` (``<out>/parts``): the batches of one sampling run, see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.run_file = self.root / "run.json"

    def _parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.npz"))

    def prepare(self, fingerprint: dict[str, Any], num_samples: int, rank: int) -> set[int]:
        """Check (rank 0: create) run.json; return the sample indices in [0, num_samples) on disk.

        ValueError naming the differing settings when the parts on disk were made with others.
        """
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            old = json.loads(self.run_file.read_text()) if self.run_file.is_file() else None
            diff = sorted(
                k for k in fingerprint if old is not None and old.get(k) != fingerprint[k]
            )
            if diff and self._parts():
                raise ValueError(
                    f"{self.run_file}: these samples were made with different {diff}; use another "
                    f"--out or delete {self.root}"
                )
            if old != fingerprint:  # new, or a run that stopped before its first part
                atomic_write_json(self.run_file, fingerprint)
        done: set[int] = set()
        for f in self._parts():
            with np.load(f) as d:
                done.update(int(i) for i in d["indices"] if 0 <= int(i) < num_samples)
        return done

    def write(
        self,
        rank: int,
        indices: torch.Tensor,
        images: np.ndarray,
        labels: torch.Tensor,
        pairs: list[int],
        tokens: list[int],
    ) -> None:
        """One batch: sample ``indices`` [b], uint8 ``images`` [b, H, W, C], ``labels`` [b], and the
        (token, expert) ``pairs`` and ``tokens`` per MoE layer it added to C_infer."""
        name = f"part-{int(indices[0]):08d}-r{rank:04d}.npz"
        tmp = self.root / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                indices=indices.numpy(),
                images=images,
                labels=labels.numpy(),
                pairs=np.asarray(pairs, np.int64),
                tokens=np.asarray(tokens, np.int64),
            )
        tmp.replace(self.root / name)  # atomic: a part is complete or absent

    def read(self, num_samples: int) -> tuple[np.ndarray, list[int], list[int]]:
        """All samples [num_samples, H, W, C] from the parts, and the C_infer counts summed over them.

        ValueError when a sample is missing or the parts disagree on the image shape.
        """
        n = num_samples
        images: np.ndarray | None = None
        have = np.zeros(n, dtype=bool)
        pairs: np.ndarray | None = None
        tokens: np.ndarray | None = None
        for f in self._parts():
            with np.load(f) as d:
                idx, imgs = d["indices"], d["images"]
                if images is None:
                    images = np.zeros((n, *imgs.shape[1:]), dtype=np.uint8)
                if imgs.shape[1:] != images.shape[1:]:
                    raise ValueError(
                        f"{f}: images {imgs.shape[1:]} differ from the others' {images.shape[1:]}"
                    )
                images[idx], have[idx] = imgs, True
                pairs = d["pairs"] if pairs is None else pairs + d["pairs"]
                tokens = d["tokens"] if tokens is None else tokens + d["tokens"]
        if images is None or not have.all():
            missing = np.flatnonzero(~have)
            raise ValueError(
                f"{self.root}: {len(missing)} of {n} samples missing (first {missing[:5].tolist()})"
            )
        assert pairs is not None and tokens is not None
        return images, [int(v) for v in pairs], [int(v) for v in tokens]

    def remove(self) -> None:
        """Delete the store (the run's outputs are written; --keep-parts skips this)."""
        shutil.rmtree(self.root)
