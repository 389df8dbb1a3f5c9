"""Count a model's parameters as the paper reports them, without allocating any weights.

    python tools/count_params.py --config configs/X.yaml [--set k=v ...] [--json]
    python tools/count_params.py --name DiffMoE-L-E16 [--json]

The model is built on the meta device (shapes only, no memory), so even DiffMoE-XL-E16 counts in a
second. total: every parameter, router and capacity predictor included. activated
(dense-equivalent): one expert per MoE layer, no router, no predictor (see models/params.py).
With --json the only output is one line: {"total": N, "activated": N}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Runnable as `python tools/count_params.py` from a checkout without installing the package.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from diffmoe_dist.config import Config, load_config  # noqa: E402
from diffmoe_dist.models.dit import DiffMoE  # noqa: E402
from diffmoe_dist.models.params import count_params  # noqa: E402
from diffmoe_dist.transport.objective import model_out_channels  # noqa: E402


def build_meta(cfg: Config) -> DiffMoE:
    """The model with every tensor on the meta device: real shapes, no storage, no init cost."""
    with torch.device("meta"):
        return DiffMoE(cfg.model, cfg.moe, out_channels=model_out_channels(cfg))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--name", help="registry model name (shortcut for --set model.name=NAME)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", action="store_true", help='print {"total": N, "activated": N} only')
    args = ap.parse_args(argv)
    if args.config is None and args.name is None:
        ap.error("give --config FILE or --name MODEL")
    overrides = list(args.overrides)
    if args.name:
        overrides.insert(0, f"model.name={args.name}")
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as e:
        print(f"count_params: {e}", file=sys.stderr)
        return 2
    counts = count_params(build_meta(cfg))
    if args.json:
        print(json.dumps({"total": counts["total"], "activated": counts["activated"]}))
        return 0
    m, moe = cfg.model, cfg.moe
    rows = [
        ("model", m.name or "(custom)"),
        ("depth / width / heads", f"{m.depth} / {m.hidden_size} / {m.num_heads}"),
        ("routing mode", moe.mode),
        ("experts", str(moe.num_experts) if moe.mode != "dense" else "-"),
        ("total params", f"{counts['total']:,} ({counts['total'] / 1e6:.1f}M)"),
        ("activated params", f"{counts['activated']:,} ({counts['activated'] / 1e6:.1f}M)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
