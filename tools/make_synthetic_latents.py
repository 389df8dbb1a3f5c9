"""Write random latents in the real shard format, for throughput runs without a prepared dataset.

    python tools/make_synthetic_latents.py --config configs/imagenet256/diffmoe_l_e16.yaml \
        --out /scratch/synthetic_latents --count 8192
    diffmoe-train --config configs/imagenet256/diffmoe_l_e16.yaml \
        --set data.path=/scratch/synthetic_latents --set train.precision=bf16 ...

Latents are N(0, 1) (VAE latents times 0.18215 have about unit variance), labels uniform over the
model's classes, the flipped copy is the latent mirrored along W; deterministic given --seed. The
shape (C, H, W) and the number of classes come from the config's model section (or --channels,
--size, --num-classes). Same writer as tools/extract_latents.py: checksummed shards, and a manifest
written last, so an interrupted run leaves nothing a trainer would read. Throughput only: a model
trained on this learns nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from diffmoe_dist.config import load_config  # noqa: E402
from diffmoe_dist.data.latents import MANIFEST_NAME, LatentShardWriter  # noqa: E402

CHUNK = 1024  # samples generated per write: bounded memory whatever --count is


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
        gen = torch.Generator().manual_seed(args.seed)
        shape = (args.channels, args.size, args.size)
        with LatentShardWriter(
            args.out,
            shard_size=args.shard_size,
            num_classes=args.num_classes,
            overwrite=args.overwrite,
        ) as writer:
            for start in range(0, args.count, CHUNK):
                n = min(CHUNK, args.count - start)
                lat = torch.randn((n, *shape), generator=gen)
                labels = torch.randint(0, args.num_classes, (n,), generator=gen)
                writer.add(lat, lat.flip(-1), labels)
    except ValueError as e:
        print(f"make_synthetic_latents: error: {e}", file=sys.stderr)
        return 2
    info = {"out": args.out, "count": args.count, "shape": list(shape), "classes": args.num_classes}
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
