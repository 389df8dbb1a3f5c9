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

This file parses arguments; the work is diffmoe_dist/inference/evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from diffmoe_dist.inference import evaluate_checkpoint, evaluate_samples
from diffmoe_dist.parallel.distributed import cleanup


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
