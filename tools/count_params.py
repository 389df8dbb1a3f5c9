"""Count a model's parameters as the paper reports them, without allocating any weights.

    python tools/count_params.py --config configs/X.yaml [--set k=v ...] [--json]
    python tools/count_params.py --name DiffMoE-L-E16 [--json]

The code is diffmoe_dist/models/params.py (``main``; ``count_config_params`` for a config).
"""

import sys
from pathlib import Path

# Runnable as `python tools/count_params.py` from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffmoe_dist.models.params import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
