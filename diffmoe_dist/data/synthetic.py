"""Random latents in the real shard format, for throughput runs without a prepared dataset.

    python tools/make_synthetic_latents.py --config configs/imagenet256/diffmoe_l_e16.yaml \
        --out /scratch/synthetic_latents --count 8192
    diffmoe-train --config configs/imagenet256/diffmoe_l_e16.yaml \
        --set data.path=/scratch/synthetic_latents --set train.precision=bf16 ...

Latents are N(0, 1) (VAE latents times 0.18215 have about unit variance), labels uniform over the
model's classes, the flipped copy is the latent mirrored along W; deterministic given --seed. The
shape (C, H, W) and the number of classes come from the config's model section (or --channels,
--size, --num-classes). Same writer as the extraction (data/extract.py): checksummed shards, and a
manifest written last, so an interrupted run leaves nothing a trainer would read. Throughput only: a
model trained on this learns nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from diffmoe_dist.config import load_config
from diffmoe_dist.data.latents import MANIFEST_NAME, LatentShardWriter

CHUNK = 1024  # samples generated per write: bounded memory whatever the count


def write_synthetic_latents(
    out: str | os.PathLike[str],
    count: int,
    shape: tuple[int, int, int],
    num_classes: int,
    shard_size: int = 1024,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Write ``count`` samples of latents N(0, 1) of ``shape`` (C, H, W), their mirror along W as
    the flipped copy, and labels uniform in [0, num_classes), drawn in that order, CHUNK samples at
    a time, from one generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with LatentShardWriter(
        out, shard_size=shard_size, num_classes=num_classes, overwrite=overwrite
    ) as writer:
        for start in range(0, count, CHUNK):
            n = min(CHUNK, count - start)
            lat = torch.randn((n, *shape), generator=gen)
            labels = torch.randint(0, num_classes, (n,), generator=gen)
            writer.add(lat, lat.flip(-1), labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="make_synthetic_latents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--count", type=int, required=True, help="number of samples")
    p.add_argument("--config", help="take channels, latent size and classes from this config")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--size", type=int, default=32, help="latent side H = W")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    args = p.parse_args(argv)
    try:
        if args.config:
            m = load_config(args.config).model
            args.channels, args.size, args.num_classes = m.in_channels, m.input_size, m.num_classes
        for name in ("count", "channels", "size", "num_classes"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}; must be > 0")
        if (Path(args.out) / MANIFEST_NAME).exists() and not args.overwrite:
            raise ValueError(
                f"--out {args.out} already holds a dataset ({MANIFEST_NAME}); pass --overwrite to "
                "replace it, or choose another --out"
            )
        shape = (args.channels, args.size, args.size)
        write_synthetic_latents(
            args.out,
            args.count,
            shape,
            args.num_classes,
            args.shard_size,
            args.seed,
            args.overwrite,
        )
    except ValueError as e:
        print(f"make_synthetic_latents: error: {e}", file=sys.stderr)
        return 2
    info = {"out": args.out, "count": args.count, "shape": list(shape), "classes": args.num_classes}
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
