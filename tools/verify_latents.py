"""Check a latent shard directory completely: manifest, every shard's size, header and sha256, labels.

The command and its documentation live in diffmoe_dist/data/verify.py
(`python tools/verify_latents.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from diffmoe_dist.data.verify import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
