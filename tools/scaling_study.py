#!/usr/bin/env python
"""Scaling study (one model, several layouts): a shell over diffmoe_dist/studies/scaling_study.py,
where the flags are documented (--help); passes this checkout for --launcher slurm."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from diffmoe_dist.studies.scaling_study import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(checkout=ROOT))
