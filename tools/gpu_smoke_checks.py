"""Shell over diffmoe_dist/parallel/gpu_checks.py (the checks of tools/gpu_smoke.sh, on every rank).

torchrun --standalone --nproc-per-node N tools/gpu_smoke_checks.py --out checks.json [--device cpu]
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install

from diffmoe_dist.parallel.gpu_checks import main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = sys.argv[1:]
    if "--config" not in args:
        args += ["--config", str(REPO / "configs" / "tiny.yaml")]
    sys.exit(main(args))
