"""Scoring: ``evaluate_checkpoint`` samples from a checkpoint and scores the samples,
``evaluate_samples`` scores a samples file. What is scored for which job, and the command line, are in
the docstring of ``diffmoe-eval`` (diffmoe_dist/evaluate.py), which calls these two. A missing --ref or
--inception, or one that cannot be read, is refused before any sampling.
"""

from __future__ import annotations

from typing import Any

from diffmoe_dist.inference.driver import sample_from_checkpoint
from diffmoe_dist.inference.generate import class_labels
from diffmoe_dist.inference.load import resolve_with_config
from diffmoe_dist.parallel.distributed import init_distributed


def evaluate_checkpoint(
    run_dir: str | None,
    checkpoint: str | None,
    overrides: list[str],
    vae: str | None = None,
    ref: str | None = None,
    inception: str | None = None,
    batch_size: int = 50,
) -> dict[str, Any] | None:
    """Sample and score; every rank calls it, rank 0 gets the result dict (others None)."""
    ckpt, cfg = resolve_with_config(run_dir, checkpoint, overrides)
    if cfg.data.name == "latents" and not (ref and inception):
        raise ValueError(
            "data.name=latents is scored by FID: give --ref FILE.npz and --inception WEIGHTS.pth "
            "(and --vae DIR to decode the samples)"
        )
    if cfg.data.name == "digits" and ref:
        raise ValueError(
            "--ref (FID with Inception) needs RGB samples; the digits job uses its judge"
        )
    if ref or inception:
        from diffmoe_dist.quality.fid import check_paths

        if not (ref and inception):
            raise ValueError("FID needs both --ref and --inception")
        check_paths(ref, inception)  # before minutes of sampling
    labels = class_labels(cfg, None)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    images, report = sample_from_checkpoint(
        cfg, ckpt, labels, info, vae, follow_latest=not checkpoint
    )
    if images is None:
        return None
    if cfg.data.name == "digits":
        from diffmoe_dist.quality.digits import DigitsJudge

        return {**report, **DigitsJudge.load_or_fit().evaluate(images, labels.numpy())}
    from diffmoe_dist.quality.fid import FIDScorer

    assert ref and inception
    scorer = FIDScorer(ref, inception, info.device, batch_size)
    return {**report, **scorer.score(images, cfg.sample.num_samples)}


def evaluate_samples(
    samples: str, ref: str | None, inception: str | None, num: int | None, batch_size: int = 50
) -> dict[str, Any]:
    """Score an existing samples .npz (arr_0 uint8 NHWC) against a reference."""
    from diffmoe_dist.quality.fid import FIDScorer, load_samples

    if not (ref and inception):
        raise ValueError("--samples needs --ref FILE.npz and --inception WEIGHTS.pth")
    images = load_samples(samples)
    scorer = FIDScorer(ref, inception, "cuda" if _cuda() else "cpu", batch_size)
    return {"samples": samples, **scorer.score(images, num, f"samples {samples}")}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
