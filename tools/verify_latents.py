"""Check a latent shard directory completely: manifest, every shard's size, header and sha256, labels.

    python tools/verify_latents.py /scratch/imagenet256_latents [--jobs 8]

A trainer checks sizes and headers of every shard at start-up and, with the default
``data.verify=auto``, hashes a set of at most 4 GiB too; a larger set is hashed shard by shard as the
run first reads it. Run this once on a large set (after copying it to the cluster, say) so a bad shard
77 of 100 is found now and not in the middle of a run; then train with ``data.verify=never`` or leave
``auto``. Exit status 0 when every shard verifies, 2 naming the first bad one otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from diffmoe_dist.data.latents import LatentShardDataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="verify_latents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="latent shard directory (holds manifest.json)")
    p.add_argument("--jobs", type=int, default=4, help="shards hashed at once (threads)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        print(f"verify_latents: error: --jobs={args.jobs}; must be >= 1", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        ds = LatentShardDataset(args.path, verify="never")  # sizes and headers of every shard
        shards = ds.manifest["shards"]
        # hashlib releases the GIL on large reads, so threads hash shards in parallel.
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(ds.verify_checksum, range(len(shards))))
        for i in range(len(shards)):
            ds._shard(i)  # maps it and checks its labels within [0, num_classes)
    except ValueError as e:
        print(f"verify_latents: error: {e}", file=sys.stderr)
        return 2
    total = sum(s["bytes"] for s in shards)
    info = {
        "path": args.path,
        "ok": True,
        "shards": len(shards),
        "count": len(ds),
        "bytes": total,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
