"""FID / IS / precision-recall: the Frechet distance against an independent computation on known
Gaussians, identical sets ~0, the Inception pipeline end to end on a randomly initialised network
(plumbing only), the real-weights path when the weights file exists, and bad references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffmoe_dist.quality.fid import (
    FIDScorer,
    inception_score,
    load_reference,
    precision_recall,
)
from diffmoe_dist.quality.frechet import frechet_distance, gaussian_stats

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = Path(
    os.environ.get(
        "DIFFMOE_INCEPTION_WEIGHTS",
        Path.home() / ".cache" / "diffmoe_dist" / "weights-inception-2015-12-05-6726825d.pth",
    )
)


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _independent_fd(mu1, s1, mu2, s2) -> float:
    """Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), with symmetric eigendecompositions
    only (no sqrtm of a non-symmetric product as in the implementation)."""
    w, v = np.linalg.eigh(s1)
    r = v @ np.diag(np.sqrt(w)) @ v.T
    lam = np.linalg.eigvalsh(r @ s2 @ r)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())


def test_frechet_matches_independent_computation() -> None:
    rng = np.random.default_rng(0)
    for d in (1, 5, 64):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _spd(rng, d), _spd(rng, d)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(_independent_fd(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)
    # Closed form for diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    m = rng.normal(size=8)
    want = (m**2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m, np.diag(a), np.zeros(8), np.diag(b)) == pytest.approx(
        want, rel=1e-10
    )


def test_low_rank_fid_matches_frechet_distance() -> None:
    """The N < F shortcut used for small sample sets agrees with the sqrtm formula."""
    from diffmoe_dist.quality.fid import fid_from_features

    rng = np.random.default_rng(6)
    d = 64
    mu_r, s_r = rng.normal(size=d), _spd(rng, d)
    for n in (5, 30):
        x = rng.normal(size=(n, d)) * 2 + 1
        want = frechet_distance(*gaussian_stats(x), mu_r, s_r)
        assert fid_from_features(x, mu_r, s_r) == pytest.approx(want, rel=1e-7, abs=1e-9)
        assert fid_from_features(x, *gaussian_stats(x)) == pytest.approx(
            0.0, abs=1e-5
        )  # trace ~500


def test_frechet_of_samples_from_known_gaussians() -> None:
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _spd(rng, d), _spd(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    got = frechet_distance(*gaussian_stats(x), *gaussian_stats(y))
    assert got == pytest.approx(_independent_fd(mu1, s1, mu2, s2), rel=0.02)


def test_identical_sets_give_zero() -> None:
    f = np.random.default_rng(2).normal(size=(500, 32))
    st = gaussian_stats(f)
    assert abs(frechet_distance(*st, *st)) < 1e-8
    assert precision_recall(f, f) == (1.0, 1.0)


def test_inception_score_and_precision_recall_known_cases() -> None:
    k = 10
    confident = np.full((100, k), -30.0)
    confident[np.arange(100), np.arange(100) % k] = 30.0  # each sample sure, classes balanced
    assert inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-6)
    assert inception_score(np.zeros((100, k)), splits=2)[0] == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    real = rng.normal(size=(200, 8))
    p, r = precision_recall(real, real + 100.0)  # disjoint manifolds
    assert (p, r) == (0.0, 0.0)
    with pytest.raises(ValueError, match="needs > 3 samples"):
        precision_recall(real[:3], real)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(4).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ref_file(tmp_path_factory: pytest.TempPathFactory, images: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    np.savez(path, arr_0=images)
    return path


def test_pipeline_end_to_end_random_inception(
    tmp_path: Path, images: np.ndarray, ref_file: Path
) -> None:
    """Plumbing with a random network: the numbers mean nothing, but identical sets must give ~0,
    and the CLI path (--samples) must agree with the library."""
    scorer = FIDScorer(ref_file, "random")
    res = scorer.score(images, num_samples=10)
    assert abs(res["fid"]) < 1e-6 * max(1.0, float(np.trace(scorer.ref.sigma)))
    assert (res["precision"], res["recall"]) == (1.0, 1.0)
    assert res["inception_score"] >= 1.0 - 1e-9 and res["num_eval_samples"] == 10
    # A reference of precomputed statistics only: FID without precision/recall.
    stats = tmp_path / "stats.npz"
    mu, sigma = gaussian_stats(np.random.default_rng(5).normal(size=(3000, 2048)))
    np.savez(stats, mu=mu, sigma=sigma)
    res2 = FIDScorer(stats, "random").score(images[:4])
    assert res2["precision"] is None and res2["fid"] > 0
    # CLI on an existing samples file
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images[:4])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "diffmoe_dist.evaluate", "--samples", str(samples)]
    cmd += ["--ref", str(stats), "--inception", "random", "--json"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["fid"] == pytest.approx(res2["fid"])


def test_bad_reference_and_too_few_samples(
    tmp_path: Path, images: np.ndarray, ref_file: Path
) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=f"reference {bad}: mu .*2048"):
        load_reference(bad, None)
    gray = tmp_path / "gray.npz"
    np.savez(gray, arr_0=np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(
        ValueError, match=f"reference {gray} arr_0: images must be uint8 \\[N, H, W, 3\\]"
    ):
        load_reference(gray, object())
    neither = tmp_path / "neither.npz"
    np.savez(neither, x=np.zeros(3))
    with pytest.raises(ValueError, match=f"{neither} has neither"):
        load_reference(neither, None)
    with pytest.raises(ValueError, match="missing.npz not found"):
        FIDScorer(tmp_path / "missing.npz", "random")
    with pytest.raises(ValueError, match="Inception weights .*nope.pth not found"):
        FIDScorer(ref_file, tmp_path / "nope.pth")
    scorer = FIDScorer(ref_file, "random")
    with pytest.raises(ValueError, match="samples has 10 images, fewer than the 50 asked for"):
        scorer.score(images, num_samples=50)


@pytest.mark.skipif(
    not WEIGHTS.is_file(),
    reason=f"real Inception weights not found at {WEIGHTS} (set DIFFMOE_INCEPTION_WEIGHTS to "
    "weights-inception-2015-12-05-6726825d.pth from the torch-fidelity v0.2.0 release)",
)
def test_real_weights(images: np.ndarray, ref_file: Path) -> None:
    scorer = FIDScorer(ref_file, WEIGHTS)
    res = scorer.score(images)
    assert abs(res["fid"]) < 1e-3 and (scorer.ref.pool >= 0).all()  # pool3 follows a ReLU
    assert 1.0 <= res["inception_score"] <= 1008
