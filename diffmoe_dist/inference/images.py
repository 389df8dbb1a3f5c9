"""Sampled images on disk: uint8 NHWC arrays, a labelled PNG grid, the ``.npz`` of the ADM suite.

``save_samples`` writes what ``diffmoe-sample`` leaves in its output directory: ``grid.png`` (the
first 100), optionally ``samples.npz`` (uint8 NHWC under ``arr_0``, labels under ``labels``), and
``sample_report.json``; each file is written whole or not at all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmoe_dist.fsutil import atomic_write_bytes


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] -> uint8 NHWC (ADM .npz convention)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, ncol: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(ncol * 0.8, nrow * 0.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_title(str(int(labels[i])), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_samples(
    out: Path, images: np.ndarray, labels: np.ndarray, report: dict[str, Any], npz: bool
) -> None:
    """``out``/grid.png (first 100 samples), samples.npz when ``npz``, sample_report.json.

    images: uint8 [N, H, W, C]; labels: [N] class indices.
    """
    out.mkdir(parents=True, exist_ok=True)
    k = min(len(images), 100)
    save_grid(images[:k], labels[:k], out / "grid.png")
    if npz:
        tmp = out / "samples.tmp.npz"  # np.savez appends .npz to names without it
        np.savez(tmp, arr_0=images, labels=labels)
        tmp.replace(out / "samples.npz")
    atomic_write_bytes(out / "sample_report.json", json.dumps(report, indent=1).encode())
