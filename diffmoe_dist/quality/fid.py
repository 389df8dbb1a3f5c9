"""FID, Inception Score and precision/recall of generated images against a reference (ADM protocol).

Reference (``--ref FILE.npz``), either of:
  * images: ``arr_0`` uint8 [N, H, W, 3] (an ADM reference batch such as VIRTUAL_imagenet256_labeled.npz
    holds these *and* ``mu``/``sigma``);
  * statistics: ``mu`` [2048] and ``sigma`` [2048, 2048] of pool3 features.
FID uses the reference's ``mu``/``sigma`` when present (as ADM's evaluator does), else the statistics of
its images. Precision/recall (Kynkaanniemi et al. 2019, k = 3, on pool3 features, as in ADM's
evaluator) needs reference images; with statistics only it is reported as None. Inception Score:
softmax of the 1008 logits, 10 splits, exp(E KL(p(y|x) || p(y))).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmoe_dist.quality.frechet import frechet_distance, gaussian_stats
from diffmoe_dist.quality.inception import check_images, inception_features

POOL_DIM = 2048


@dataclass
class Reference:
    path: Path
    mu: np.ndarray
    sigma: np.ndarray
    pool: np.ndarray | None  # [N, 2048] features of the reference images, if it has images


def load_reference(
    path: str | os.PathLike[str], net: Any | None, batch_size: int = 50, progress: bool = False
) -> Reference:
    """Read a reference .npz (images and/or mu/sigma); image features are computed with ``net``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"reference {p} not found")
    try:
        data = np.load(p)
    except (OSError, ValueError) as e:
        raise ValueError(f"reference {p} is not a readable .npz: {e}") from e
    with data:
        keys = set(data.files)
        if "arr_0" not in keys and not {"mu", "sigma"} <= keys:
            raise ValueError(
                f"reference {p} has neither 'arr_0' (images) nor 'mu' and 'sigma' ({sorted(keys)})"
            )
        pool = None
        if "arr_0" in keys:
            if net is None:
                raise ValueError(f"reference {p} holds images: an Inception network is needed")
            images = check_images(data["arr_0"], f"reference {p} arr_0")
            pool = inception_features(net, images, batch_size, str(p), progress)["pool"]
        if {"mu", "sigma"} <= keys:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            if mu.shape != (POOL_DIM,) or sigma.shape != (POOL_DIM, POOL_DIM):
                raise ValueError(
                    f"reference {p}: mu {mu.shape} / sigma {sigma.shape} must be ({POOL_DIM},) / "
                    f"({POOL_DIM}, {POOL_DIM}) (Inception pool3 statistics)"
                )
        else:
            assert pool is not None
            if len(pool) < 2:
                raise ValueError(f"reference {p} has {len(pool)} image(s); need at least 2")
            mu, sigma = gaussian_stats(pool)
    return Reference(p, mu, sigma, pool)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` consecutive parts of exp(E_x KL(p(y|x) || p(y)))."""
    logits = np.asarray(logits, dtype=np.float64)
    splits = max(1, min(splits, len(logits)))
    p = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-20) - np.log(py + 1e-20))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_radius(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    out = []
    for s in range(0, len(x), batch):
        d = torch.cdist(x[s : s + batch], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(out)


def _covered(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    """Fraction of points inside at least one ball (center, radius)."""
    hits = []
    for s in range(0, len(points), batch):
        d = torch.cdist(points[s : s + batch], centers)
        hits.append((d <= radii[None]).any(1))
    return float(torch.cat(hits).double().mean())


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1000
) -> tuple[float, float]:
    """Improved precision/recall: precision = share of fakes in the real k-NN manifold, recall the
    reverse."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs > {k} samples per set, got {len(real)}, {len(fake)}"
        )
    r, f = (
        torch.from_numpy(np.asarray(real, np.float64)),
        torch.from_numpy(np.asarray(fake, np.float64)),
    )
    precision = _covered(f, r, _kth_radius(r, k, batch), batch)
    recall = _covered(r, f, _kth_radius(f, k, batch), batch)
    return precision, recall


def fid_from_features(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FID of a feature set [N, F] against reference statistics.

    With N - 1 >= F this is ``frechet_distance`` (scipy sqrtm, as pytorch-fid / ADM). With fewer
    samples than dimensions (small checks; a 2048-d sqrtm takes ~40 s on one core) it uses the exact
    low-rank identity: with B the centred features, S = B^T B / (N - 1) and the non-zero eigenvalues
    of S_ref S equal those of B S_ref B^T / (N - 1) (N x N, symmetric), so
    Tr (S_ref S)^(1/2) = sum sqrt(eigvalsh(B S_ref B^T / (N - 1))).
    """
    mu, sigma = gaussian_stats(features)
    n, f = features.shape
    if n - 1 >= f:
        return frechet_distance(mu, sigma, mu_ref, sigma_ref)
    if mu_ref.shape != mu.shape or sigma_ref.shape != sigma.shape:
        raise ValueError(f"shape mismatch: features {features.shape}, reference mu {mu_ref.shape}")
    b = np.asarray(features, np.float64) - mu
    m = b @ sigma_ref @ b.T / (n - 1)
    lam = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)
    diff = mu - mu_ref
    return float(diff @ diff + np.trace(sigma) + np.trace(sigma_ref) - 2 * np.sqrt(lam).sum())


def score_images(
    images: np.ndarray,
    ref: Reference,
    net: Any,
    num_samples: int | None = None,
    batch_size: int = 50,
    where: str = "samples",
    progress: bool = False,
) -> dict[str, Any]:
    """FID / IS / precision / recall of uint8 NHWC ``images`` against ``ref``."""
    a = check_images(images, where)
    if num_samples is not None:
        if len(a) < num_samples:
            raise ValueError(f"{where} has {len(a)} images, fewer than the {num_samples} asked for")
        a = a[:num_samples]
    if len(a) < 2:
        raise ValueError(f"{where} has {len(a)} image(s); FID needs at least 2")
    feats = inception_features(net, a, batch_size, where, progress)
    is_mean, is_std = inception_score(feats["logits"])
    result: dict[str, Any] = {
        "fid": fid_from_features(feats["pool"], ref.mu, ref.sigma),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "precision": None,
        "recall": None,
        "num_eval_samples": len(a),
        "reference": str(ref.path),
    }
    if ref.pool is not None:
        result["precision"], result["recall"] = precision_recall(ref.pool, feats["pool"])
    return result


def load_samples(path: str | os.PathLike[str]) -> np.ndarray:
    """``arr_0`` of a samples .npz (as diffmoe-sample or ADM's samplers write it)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"samples file {p} not found")
    with np.load(p) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"samples file {p} has no 'arr_0' ({data.files})")
        return check_images(data["arr_0"], f"samples {p} arr_0")


class FIDScorer:
    """Inception network + reference statistics, loaded once, for scoring several sample sets."""

    def __init__(
        self,
        ref: str | os.PathLike[str],
        inception: str | os.PathLike[str],
        device: torch.device | str = "cpu",
        batch_size: int = 50,
        progress: bool = False,
    ) -> None:
        from diffmoe_dist.quality.inception import build_inception

        check_paths(ref, inception)
        self.net = build_inception(inception, device)
        self.batch_size, self.progress = batch_size, progress
        self.ref = load_reference(ref, self.net, batch_size, progress)

    def score(
        self, images: np.ndarray, num_samples: int | None = None, where: str = "samples"
    ) -> dict[str, Any]:
        return score_images(
            images, self.ref, self.net, num_samples, self.batch_size, where, self.progress
        )


def check_paths(ref: str | os.PathLike[str], inception: str | os.PathLike[str]) -> None:
    """Fail before any sampling when the reference or the weights file is missing."""
    if not Path(ref).is_file():
        raise ValueError(f"reference {ref} not found")
    if str(inception) != "random" and not Path(inception).is_file():
        raise ValueError(f"Inception weights {inception} not found")
