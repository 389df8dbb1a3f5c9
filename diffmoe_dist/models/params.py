"""Parameter counts as the paper reports them (and the ``tools/count_params.py`` command).

total: every parameter, router and capacity predictor included (the expert count is the global one,
whatever slice this rank holds). activated (dense-equivalent): what one token passes through, i.e.
one expert per MoE layer, no router, no predictor, so DiffMoE-L-E16 counts as DiT-L. expert: the
parameters of all experts of all MoE layers (what expert parallelism splits over ep ranks; every
rank holds the rest, total - expert). The planner (planner/cost_model.py) counts with these too.

    python tools/count_params.py --config configs/X.yaml [--set k=v ...] [--json]
    python tools/count_params.py --name DiffMoE-L-E16 [--json]

The command builds the model on the meta device (shapes only, no memory), so even DiffMoE-XL-E16
counts in a second. With --json the only output is one line: {"total": N, "activated": N}.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn as nn

from diffmoe_dist.config import Config, load_config
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.models.moe import MoELayer
from diffmoe_dist.transport.objective import model_out_channels


def count_params(model: nn.Module) -> dict[str, int]:
    """{"total", "activated", "expert"} of ``model`` (module docstring)."""
    total = activated = expert = 0
    moe_ids: set[int] = set()
    for layer in model.modules():
        if isinstance(layer, MoELayer) and layer.mode != "dense":
            n_router = sum(p.numel() for p in layer.router.parameters())
            n_pred = (
                sum(p.numel() for p in layer.predictor.parameters()) if layer.has_predictor else 0
            )
            ex = layer.experts
            per_expert = sum(p.numel() for p in ex.parameters()) // ex.num_experts
            total += n_router + n_pred + per_expert * layer.num_experts
            activated += per_expert
            expert += per_expert * layer.num_experts
            moe_ids.update(id(p) for p in layer.parameters())
    for p in model.parameters():
        if id(p) not in moe_ids:
            total += p.numel()
            activated += p.numel()
    return {"total": total, "activated": activated, "expert": expert}


def count_config_params(cfg: Config) -> dict[str, int]:
    """count_params of the model ``cfg`` trains, built on the meta device (real shapes, no storage)."""
    # the objective decides the output channels (ddpm learns a variance: 2C)
    with torch.device("meta"):
        return count_params(DiffMoE(cfg.model, cfg.moe, out_channels=model_out_channels(cfg)))


def main(argv: list[str] | None = None) -> int:
    """``tools/count_params.py``: 0, or 2 with a message naming the bad key or flag."""
    ap = argparse.ArgumentParser(
        prog="count_params", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
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
    counts = count_config_params(cfg)
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
