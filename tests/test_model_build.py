"""Start-up memory (issue 18 item 14): each rank builds only its own experts, the EMA is built on the
meta device and filled from the model, and resume stages checkpoint reads through the CPU. The weights
must be those of today's construction (the full model built from the seed, then sliced)."""

from __future__ import annotations

import torch
from helpers_run import TINY

from diffmoe_dist.config import load_config
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.models.moe import expert_slice
from diffmoe_dist.parallel.parallelize import build_copy, build_model, build_parallel_state


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_sliced_build_gives_the_full_models_slice() -> None:
    from diffmoe_dist.parallel.parallelize import MoELayer, shard_experts

    cfg = load_config(TINY, ["moe.num_experts=8"])
    for ep in (2, 4):
        for ep_rank in range(ep):
            torch.manual_seed(3)
            ref = DiffMoE(cfg.model, cfg.moe)
            after_ref = torch.rand(4)  # the generator must end where the full build left it
            for layer in ref.modules():
                if isinstance(layer, MoELayer):
                    shard_experts(layer, ep, ep_rank)
            torch.manual_seed(3)
            with expert_slice(ep, ep_rank):
                got = DiffMoE(cfg.model, cfg.moe)
            assert torch.equal(torch.rand(4), after_ref)
            a, b = _state(ref), _state(got)
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (ep, ep_rank, k)
            experts = [m.experts for m in got.moe_layers()]
            assert all(e.w1.shape[0] == 8 // ep for e in experts)  # never held all 8
            assert all(e.expert_offset == ep_rank * 8 // ep for e in experts)


def test_build_model_and_meta_copy_match_todays_construction() -> None:
    cfg = load_config(TINY, [])
    ps = build_parallel_state(cfg, 1, 0)
    torch.manual_seed(0)
    model = build_model(cfg, ps)
    ema = build_copy(model, cfg, ps, torch.device("cpu"))
    torch.manual_seed(0)
    ref = DiffMoE(cfg.model, cfg.moe)
    for k, v in _state(ref).items():
        assert torch.equal(model.state_dict()[k], v), k
        assert torch.equal(ema.state_dict()[k], v), k
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    # the copy is its own memory, not a view of the model's
    next(model.parameters()).data.add_(1.0)
    assert not torch.equal(next(model.parameters()), next(ema.parameters()))
