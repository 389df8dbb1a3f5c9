#!/usr/bin/env python
"""Shell over diffmoe_dist/bench/moe_cli.py (`python tools/bench_moe.py --help`)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # a checkout
from diffmoe_dist.bench.moe_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
