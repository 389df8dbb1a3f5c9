"""Extract VAE latents from an ImageNet-style class folder into verified shards (see
diffmoe_dist/data/extract.py for the format, the work plan and how a rerun resumes).

    python tools/extract_latents.py --images /data/imagenet/train --out /data/in256_latents \
        --vae /models/sd-vae-ft-mse
    torchrun --nproc-per-node 8 tools/extract_latents.py --images ... --out ... --vae ...

Rerunning the same command after an interruption encodes only the shards that are missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from diffmoe_dist.data.extract import ExtractOptions, extract  # noqa: E402
from diffmoe_dist.parallel.distributed import cleanup, init_distributed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="extract_latents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", required=True, help="root/<class>/<image> folder")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward")
    p.add_argument("--scale-factor", type=float, default=0.18215)
    p.add_argument("--posterior", choices=("sample", "mean"), default="sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--num-classes", type=int, default=0, help="default: number of class folders")
    p.add_argument("--backend", default="auto", help="auto | gloo | nccl")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    opts = ExtractOptions(
        image_size=args.image_size,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        scale_factor=args.scale_factor,
        posterior=args.posterior,
        seed=args.seed,
        dtype=args.dtype,
        num_classes=args.num_classes,
    )
    try:
        info = init_distributed(args.backend)
        import torch.distributed as dist

        group = dist.group.WORLD if info.world_size > 1 else None
        summary = extract(
            args.images,
            args.out,
            args.vae,
            opts,
            rank=info.rank,
            world_size=info.world_size,
            device=info.device,
            group=group,
            progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"extract_latents: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if info.rank == 0:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
