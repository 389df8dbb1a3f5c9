"""Threshold sweep (C_infer and quality per inference threshold): a shell over
diffmoe_dist/studies/threshold_sweep.py, where the flags are documented (--help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from diffmoe_dist.studies.threshold_sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
