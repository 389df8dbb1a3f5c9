#!/usr/bin/env python
"""Plot the expert telemetry of a run (metrics.jsonl, and samples/sample_report.json when present).

    python tools/plot_telemetry.py runs/tiny [--out runs/tiny/plots]

The code is diffmoe_dist/trainer/telemetry_plots.py (``main``, ``plot_run``).
"""

import sys
from pathlib import Path

# Runnable as `python tools/plot_telemetry.py` from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffmoe_dist.trainer.telemetry_plots import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
