"""``diffmoe-eval``: sample from a checkpoint and score the samples.

Digits job: the digits judge (quality/digits.py): the accuracy of the samples against the labels
they were conditioned on and a Frechet distance to held-out real digits.
ImageNet latents: FID, Inception Score and precision/recall (quality/fid.py) against a reference
``.npz`` (images under ``arr_0`` and/or ``mu``/``sigma``, e.g. ADM's VIRTUAL_imagenet256_labeled.npz),
with the samples decoded by a local VAE and Inception weights from a local file.
Every result carries C_infer of the inference rule used (``--set moe.infer_mode=dynamic`` etc.).

    diffmoe-eval --run-dir runs/digits [--set sample.num_samples=500] [--json]
    torchrun --nproc-per-node 8 -m diffmoe_dist.evaluate --run-dir runs/in256 --vae sd-vae-ft-mse \
        --ref VIRTUAL_imagenet256_labeled.npz --inception weights-inception-2015-12-05-6726825d.pth \
        --set sample.num_samples=50000
    diffmoe-eval --samples samples.npz --ref REF.npz --inception WEIGHTS.pth   # score a file only
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from diffmoe_dist.parallel.distributed import cleanup, init_distributed
from diffmoe_dist.inference import (
    class_labels,
    resolve_with_config,
    sample_from_checkpoint,
)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="diffmoe-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir")
    p.add_argument("--checkpoint")
    p.add_argument("--samples", help="score this .npz (arr_0 uint8 NHWC) instead of sampling")
    p.add_argument(
        "--num-samples", type=int, help="with --samples: use the first N (error if fewer)"
    )
    p.add_argument("--vae", help="local diffusers AutoencoderKL directory (latents runs)")
    p.add_argument("--ref", help="reference .npz: arr_0 images and/or mu, sigma (Inception pool3)")
    p.add_argument(
        "--inception",
        help="local torch-fidelity InceptionV3 weights (.pth); 'random' = random init, tests only",
    )
    p.add_argument("--inception-batch-size", type=int, default=50)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        if args.samples:
            result: dict[str, Any] | None = evaluate_samples(
                args.samples, args.ref, args.inception, args.num_samples, args.inception_batch_size
            )
        else:
            result = evaluate_checkpoint(
                args.run_dir,
                args.checkpoint,
                args.overrides,
                args.vae,
                args.ref,
                args.inception,
                args.inception_batch_size,
            )
    except ValueError as e:
        print(f"diffmoe-eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if result is not None:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            keys = ("checkpoint", "samples", "infer_mode", "num_samples", "accuracy", "fd")
            keys += ("fid", "inception_score", "precision", "recall", "c_infer")
            for k in keys:
                if k in result:
                    print(f"{k:>16}: {result[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
