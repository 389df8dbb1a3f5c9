"""``diffmoe-sample`` (moved: the code now lives in diffmoe_dist/inference/driver.py; split next)."""

import sys

from diffmoe_dist.inference.driver import main

if __name__ == "__main__":
    sys.exit(main())
