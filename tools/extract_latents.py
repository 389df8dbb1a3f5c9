"""ImageNet-style class folder -> ADM center crop -> VAE encoder -> verified latent shards.

The command and its documentation live in diffmoe_dist/data/extract.py
(`python tools/extract_latents.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from diffmoe_dist.data.extract import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
