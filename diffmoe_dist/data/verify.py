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
import os
import sys
import time
from typing import Any

from diffmoe_dist.data.latents import LatentShardDataset


def verify_latents(path: str | os.PathLike[str], jobs: int = 4) -> dict[str, Any]:
    """Verify every shard of ``path`` (``jobs`` hashed at once); the summary, or ValueError naming
    the first bad shard."""
    if jobs < 1:
        raise ValueError(f"--jobs={jobs}; must be >= 1")
    t0 = time.perf_counter()
    ds = LatentShardDataset(path, verify="never")  # sizes and headers of every shard
    ds.verify_all(jobs)
    shards = ds.manifest["shards"]
    return {
        "path": str(path),
        "ok": True,
        "shards": len(shards),
        "count": len(ds),
        "bytes": sum(s["bytes"] for s in shards),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="verify_latents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="latent shard directory (holds manifest.json)")
    p.add_argument("--jobs", type=int, default=4, help="shards hashed at once (threads)")
    args = p.parse_args(argv)
    try:
        info = verify_latents(args.path, args.jobs)
    except ValueError as e:
        print(f"verify_latents: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
