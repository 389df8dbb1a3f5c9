"""``diffmoe-eval`` (moved: the code now lives in diffmoe_dist/inference/evaluate.py; split next)."""

import sys

from diffmoe_dist.inference.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
