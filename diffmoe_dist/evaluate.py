"""``diffmoe-eval``: sample from a checkpoint and score the samples.

For the embedded digits job the score is the digits judge (quality/digits.py): the accuracy of the
samples against the labels they were conditioned on and a Frechet distance to held-out real digits,
reported with C_infer of the inference rule used (``--set moe.infer_mode=dynamic`` etc.).

    diffmoe-eval --run-dir runs/digits [--set sample.num_samples=500] [--json]
    torchrun --nproc-per-node 2 -m diffmoe_dist.evaluate --run-dir runs/digits
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from diffmoe_dist.parallel.distributed import cleanup, init_distributed
from diffmoe_dist.sample import (
    class_labels,
    load_sampling_config,
    resolve_checkpoint,
    sample_from_checkpoint,
)


def evaluate_checkpoint(
    run_dir: str | None, checkpoint: str | None, overrides: list[str]
) -> dict[str, Any] | None:
    """Sample and score; every rank calls it, rank 0 gets the result dict (others None)."""
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    cfg = load_sampling_config(ckpt, overrides)
    if cfg.data.name != "digits":
        raise ValueError(
            "diffmoe-eval scores the digits job; FID on ImageNet latents needs the VAE + "
            "Inception pipeline, which this version does not ship"
        )
    labels = class_labels(cfg, None)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    images, report = sample_from_checkpoint(cfg, ckpt, labels, info)
    if images is None:
        return None
    from diffmoe_dist.quality.digits import DigitsJudge

    scores = DigitsJudge.load_or_fit().evaluate(images, labels.numpy())
    return {**report, **scores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="diffmoe-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir")
    p.add_argument("--checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        result = evaluate_checkpoint(args.run_dir, args.checkpoint, args.overrides)
    except ValueError as e:
        print(f"diffmoe-eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if result is not None:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            for k in ("checkpoint", "infer_mode", "num_samples", "accuracy", "fd", "c_infer"):
                print(f"{k:>12}: {result[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
