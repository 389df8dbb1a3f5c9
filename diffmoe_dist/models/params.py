"""Parameter counts as the paper reports them.

total: every parameter, router and capacity predictor included (the expert count is the global one,
whatever slice this rank holds). activated (dense-equivalent): what one token passes through, i.e.
one expert per MoE layer, no router, no predictor, so DiffMoE-L-E16 counts as DiT-L.
"""

from __future__ import annotations

import torch.nn as nn

from diffmoe_dist.models.moe import MoELayer


def count_params(model: nn.Module) -> dict[str, int]:
    total = activated = 0
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
            moe_ids.update(id(p) for p in layer.parameters())
    for p in model.parameters():
        if id(p) not in moe_ids:
            total += p.numel()
            activated += p.numel()
    return {"total": total, "activated": activated}
