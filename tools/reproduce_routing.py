"""The paper's routing comparison (Table 3) on the digits, with error bars: a shell over
diffmoe_dist/studies/reproduce_routing.py, where the flags are documented (--help). Defaults are
this checkout's: the presets in configs/, the report in docs/, the runs under runs/."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from diffmoe_dist.studies.reproduce_routing import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(root=ROOT, prog="python tools/reproduce_routing.py"))
