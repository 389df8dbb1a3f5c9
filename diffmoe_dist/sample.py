"""``diffmoe-sample``: sample from a checkpoint (EMA weights by default), data-parallel with experts
sharded as in training; writes a labelled PNG grid, optionally an ``.npz`` (uint8 NHWC under
``arr_0``, labels under ``labels``), and reports C_infer per MoE layer and averaged.

    diffmoe-sample --run-dir runs/digits [--set sample.cfg_scale=2 --set moe.infer_mode=dynamic]
    torchrun --nproc-per-node 2 -m diffmoe_dist.sample --run-dir runs/digits --set parallel.ep=2

The sampler belongs to the checkpoint's objective (``objective``): flow samples with ``sample.sampler``
euler | heun | dopri5 | sde, ddpm with ddpm (ancestral, respaced to ``sample.num_steps``) | ddim; see
transport/objective.py. ``sample.cfg_pool: auto`` picks separate CFG forwards under flow and one
joint forward under ddpm (the public code's choice).

The inference rule comes from ``moe.infer_mode`` (static | dynamic | gamma | independent), with
``moe.infer_capacity`` (static) and ``moe.gamma`` (gamma). Pools at inference are pool_samples
samples of a rank's batch when they tile it, else the whole batch (see models/moe.py).

Latent models (data.name=latents) are decoded with a local VAE: ``--vae DIR``. Each finished batch is
saved under ``<out>/parts`` (atomically); rerunning the same command samples only the missing
indices (``parts/run.json`` refuses a rerun with other settings) and C_infer covers the whole run.
Note: with the paper's pool rule a sample depends on its batch-mates, so a resumed run is a valid
sample of the same model but not bit-identical to an uninterrupted one (``independent`` is).

This file parses arguments; the work is diffmoe_dist/inference/ (driver.py and what it calls).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffmoe_dist.inference import (
    PartsStore,
    class_labels,
    output_dir,
    resolve_with_config,
    sample_from_checkpoint,
    save_samples,
)
from diffmoe_dist.parallel.distributed import cleanup, init_distributed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="diffmoe-sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", help="training run directory (its latest checkpoint is used)")
    p.add_argument("--checkpoint", help="a checkpoint directory (…/checkpoints/step-XXXXXXXX)")
    p.add_argument(
        "--out",
        help="output directory (default: <run>/samples of the checkpoint's run; required for a "
        "--checkpoint outside a run directory)",
    )
    p.add_argument("--npz", action="store_true", help="also write samples.npz (uint8 NHWC, arr_0)")
    p.add_argument("--labels", help="comma-separated class labels to cycle through")
    p.add_argument(
        "--vae", help="local diffusers AutoencoderKL directory (needed for data.name=latents)"
    )
    p.add_argument(
        "--keep-parts",
        action="store_true",
        help="keep <out>/parts (per-batch files) after finishing",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any process group: a bad flag or checkpoint costs nothing
        ckpt, cfg = resolve_with_config(args.run_dir, args.checkpoint, args.overrides)
        labels = class_labels(cfg, args.labels)
        out = output_dir(ckpt, args.out)
    except ValueError as e:
        print(f"diffmoe-sample: error: {e}", file=sys.stderr)
        return 2
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    try:
        images, report = sample_from_checkpoint(
            cfg, ckpt, labels, info, args.vae, out / "parts", follow_latest=not args.checkpoint
        )
    except ValueError as e:
        print(f"diffmoe-sample: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if images is not None:  # rank 0
        save_samples(Path(out), images, labels.numpy(), report, args.npz)
        if not args.keep_parts:
            PartsStore(out / "parts").remove()
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
