"""Random latents in the real shard format, for throughput runs without a prepared dataset.

The command and its documentation live in diffmoe_dist/data/synthetic.py
(`python tools/make_synthetic_latents.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from diffmoe_dist.data.synthetic import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
