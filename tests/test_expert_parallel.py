"""Expert parallelism on gloo CPU ranks equals the single-process, unsharded reference.

Every rank builds the same layer / model from the same seed. The reference is the unsharded copy
run on the gathered global batch in the same process (no collectives), and each rank compares its
slice: routing masks (exactly), outputs, input gradients, router and predictor gradients, each local
expert's weight gradients, weights after an AdamW step, thresholds after reduce_thresholds.

Tolerance: fp32, atol 2e-5 / rtol 1e-4. The sharded run sums the same terms in another order
(all-reduce, all-to-all, batched matmuls of other shapes), which moves results by ~1e-7 relative;
a routing or dispatch error (a wrong token, expert or weight) moves them by ~1e-1.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import DistributedError, run_distributed  # noqa: E402

from diffmoe_dist.config import from_dict  # noqa: E402
from diffmoe_dist.models.dit import DiffMoE  # noqa: E402
from diffmoe_dist.models.moe import MoELayer  # noqa: E402
from diffmoe_dist.parallel.dispatch import a2a_bytes_summary  # noqa: E402
from diffmoe_dist.parallel.grad_reduce import (  # noqa: E402
    GradReducer,
    average_gradients,
    reduce_thresholds,
)
from diffmoe_dist.parallel.parallelize import (  # noqa: E402
    build_parallel_state,
    parallelize_model,
    parallelize_moe_layer,
)

ATOL, RTOL = 2e-5, 1e-4
D, H, E, T = 16, 32, 4, 8  # layer-level sizes: hidden, expert hidden, experts, tokens per sample


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max violation of |a-b| <= ATOL + RTOL*|b| (<= 0 means within tolerance)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach(), b.detach()
    return float(((a - b).abs() - ATOL - RTOL * b.abs()).max()) if a.numel() else -1.0


def _cfg(mode: str, ep: int, global_batch: int, pool: int, capacity: float = 1.0, **model):
    return from_dict(
        {
            "model": {
                "input_size": 8,
                "in_channels": 4,
                "patch_size": 2,
                "depth": 4,
                "hidden_size": 32,
                "num_heads": 2,
                "num_classes": 10,
                **model,
            },
            "moe": {"mode": mode, "num_experts": E, "capacity": capacity, "pool_samples": pool},
            "train": {"global_batch_size": global_batch},
            "parallel": {"ep": ep, "timeout_s": 60},
        }
    )


def _aux(layer: MoELayer) -> torch.Tensor:
    s = layer.stats
    return sum(x for x in (s.cp_loss, s.balance_loss) if x is not None)


# ----------------------------------------------------------------------------------------------------
# Layer level
def _layer_case(rank: int, world: int, case: dict) -> dict:
    mode, ep, b, P = case["mode"], case["ep"], case["b"], case["pool"]
    G = world * b
    cfg = _cfg(mode, ep, G, P, case.get("capacity", 1.0))
    ps = build_parallel_state(cfg, world, rank)
    torch.manual_seed(0)
    ref = MoELayer(D, H, E, mode=mode, capacity=cfg.moe.capacity, pool_samples=P, layer_id=1)
    ep_layer = parallelize_moe_layer(copy.deepcopy(ref), ps)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(G, T, D, generator=gen) * case.get("scale", 1.0)
    TGT = torch.randn(G, T, D, generator=gen)
    if case.get("zero_rank") is not None:  # that rank's tokens score exactly 1/E: all lose ties
        z = case["zero_rank"]
        X[z * b : (z + 1) * b] = 0.0
    sl = slice(rank * b, (rank + 1) * b)
    tok = slice(rank * b * T, (rank + 1) * b * T)
    lo, hi = ep_layer.experts.expert_offset, ep_layer.experts.expert_offset + E // ep

    Xr = X.clone().requires_grad_()
    out_ref = ref(Xr)
    (((out_ref - TGT) ** 2).mean() + _aux(ref)).backward()
    xl = X[sl].clone().requires_grad_()
    out = ep_layer(xl)
    (((out - TGT[sl]) ** 2).mean() + _aux(ep_layer)).backward()
    average_gradients(ep_layer, ps)

    errs: dict[str, float] = {}
    mask_ok = torch.equal(ep_layer.stats.route_mask, ref.stats.route_mask[tok])
    errs["out"] = _err(out, out_ref[sl])
    errs["x_grad"] = _err(xl.grad, Xr.grad[sl] * world)  # local loss = mean over b, ref over G
    errs["router_grad"] = _err(ep_layer.router.weight.grad, ref.router.weight.grad)
    if ref.has_predictor:
        for n, p in ref.predictor.named_parameters():
            errs[f"predictor.{n}.grad"] = _err(
                dict(ep_layer.predictor.named_parameters())[n].grad, p.grad
            )
    for n in ("w1", "b1", "w2", "b2"):
        errs[f"experts.{n}.grad"] = _err(
            getattr(ep_layer.experts, n).grad, getattr(ref.experts, n).grad[lo:hi]
        )
    # One AdamW step on both.
    for m in (ref, ep_layer):
        torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1).step()
    errs["router_after_step"] = _err(ep_layer.router.weight, ref.router.weight)
    for n in ("w1", "w2"):
        errs[f"experts.{n}_after_step"] = _err(
            getattr(ep_layer.experts, n), getattr(ref.experts, n)[lo:hi]
        )
    # Thresholds: statistics all-reduced over the world equal the reference's mean over all pools.
    reduce_thresholds(ref, build_parallel_state(_cfg(mode, 1, G, P), 1, 0))
    reduce_thresholds(ep_layer, ps)
    errs["thresholds"] = _err(ep_layer.thresholds, ref.thresholds)
    # Byte accounting: forward token bytes = rows leaving + rows coming back, D fp32 each.
    mine = ep_layer.stats.route_mask
    n_out = int(mine[:, [e for e in range(E) if not lo <= e < hi]].sum())
    others = torch.zeros(G * T, dtype=torch.bool)  # tokens of the other ranks of my ep group
    g0 = (rank // ep) * ep
    others[g0 * b * T : (g0 + ep) * b * T] = True
    others[tok] = False
    n_in = int(ref.stats.route_mask[others][:, lo:hi].sum())
    summary = a2a_bytes_summary(ep_layer)
    rec = summary.get("layers", {}).get(1, {})
    return {
        "errs": errs,
        "mask_ok": mask_ok,
        "selected": int(mine.sum()),
        "recv_counts": int(ref.stats.route_mask[:, lo:hi].sum()),
        "bytes": rec,
        "expected_token_bytes": (n_out + n_in) * D * 4 if ep > 1 else 0,
        "span": ps.pool_span,
    }


def _layer_worker(rank: int, world: int, cases: list[dict]) -> list[dict]:
    return [_layer_case(rank, world, c) for c in cases]


def _check_layer_results(results: list[list[dict]], cases: list[dict]) -> None:
    for rank, per_rank in enumerate(results):
        for case, r in zip(cases, per_rank):
            where = f"rank {rank}, case {case}"
            assert r["mask_ok"], f"routing differs from the reference: {where}"
            bad = {k: v for k, v in r["errs"].items() if v > 0}
            assert not bad, f"beyond tolerance ({where}): {bad}"
            if case["ep"] > 1:
                b = r["bytes"]
                assert b["tokens_sent"] == b["tokens_recv"] == r["expected_token_bytes"], (where, b)
                assert b["tokens_bwd_sent"] == b["tokens_sent"], (where, b)
                E_loc = E // case["ep"]
                # static splits (expert choice, pools on one rank): no counts exchanged at all
                static = case["mode"] == "ec" or (case["mode"] == "diffmoe" and r["span"] == 1)
                counts = 0 if static else E_loc * 8 * (case["ep"] - 1)
                assert b["counts_sent"] == counts, (where, b)
                gathers = {"diffmoe": 2, "tc": 1, "ec": 0}[case["mode"]] if r["span"] > 1 else 0
                scores = gathers * case["b"] * T * E * 4 * (r["span"] - 1)
                assert b["scores_sent"] == b["scores_recv"] == scores, (where, b)


LAYER_CASES_2 = [
    # pool spans both ranks (ep 2, micro 2, pool 4): uneven splits, cross-rank top-k
    {"mode": "diffmoe", "ep": 2, "b": 2, "pool": 4},
    # pools within a rank under ep 2
    {"mode": "diffmoe", "ep": 2, "b": 4, "pool": 2},
    # rank 1's tokens all unselected: zero-row sends from rank 1, its experts still get rank 0's
    {"mode": "diffmoe", "ep": 2, "b": 2, "pool": 4, "capacity": 0.5, "scale": 5.0, "zero_rank": 1},
    {"mode": "tc", "ep": 2, "b": 2, "pool": 4},  # TC: balance statistics over the spanning pool
    {"mode": "ec", "ep": 2, "b": 2, "pool": 4},
    {"mode": "diffmoe", "ep": 1, "b": 2, "pool": 2},  # pure data parallel
]

LAYER_CASES_4 = [
    {"mode": "diffmoe", "ep": 2, "b": 2, "pool": 4},  # dp 2 x ep 2, pools span 2 ranks; edp groups
    {"mode": "diffmoe", "ep": 4, "b": 1, "pool": 4},  # one pool over all 4 ranks
    {"mode": "tc", "ep": 4, "b": 2, "pool": 2},
]


def test_layer_matches_reference_world2():
    cases = LAYER_CASES_2
    results = run_distributed(_layer_worker, 2, args=(cases,))
    _check_layer_results(results, cases)
    zero = results[1][2]
    assert zero["selected"] == 0 and zero["recv_counts"] > 0, zero  # the case tests what it says


def test_layer_matches_reference_world4():
    cases = LAYER_CASES_4
    _check_layer_results(run_distributed(_layer_worker, 4, args=(cases,), timeout_s=300), cases)


# ----------------------------------------------------------------------------------------------------
# Inference with sharded experts: per-expert counts vary, zero-token experts, all-unselected ranks.
def _inference_worker(rank: int, world: int) -> dict:
    ep, b, P = world, 3, 2  # b not a multiple of P: the whole local batch is one pool
    cfg = _cfg("diffmoe", ep, world * b, 1)
    ps = build_parallel_state(cfg, world, rank)
    torch.manual_seed(0)
    ref = MoELayer(D, H, E, mode="diffmoe", pool_samples=P, layer_id=1).eval()
    ep_layer = parallelize_moe_layer(copy.deepcopy(ref), ps).eval()
    gen = torch.Generator().manual_seed(2 + rank)  # different batches per rank
    x = torch.randn(b, T, D, generator=gen)
    out: dict = {"errs": {}, "counts": {}}
    # Expert 1 can never pass its threshold (> 1): it receives no tokens under dynamic/independent.
    thr = torch.tensor([0.5, 1.1, 0.45, 0.55])
    settings = [("static", thr), ("dynamic", thr), ("gamma", thr), ("independent", thr)]
    settings.append(("independent", torch.full((E,), 1.1)))  # nobody selected anywhere
    for i, (rule, t) in enumerate(settings):
        for m in (ref, ep_layer):
            m.thresholds.copy_(t)
            m.set_inference(rule, capacity=0.5, gamma=0.5)
        with torch.no_grad():
            y_ref, y = ref(x), ep_layer(x)
        key = f"{i}:{rule}"
        out["errs"][key] = _err(y, y_ref)
        out["counts"][key] = ref.stats.expert_counts.tolist()
        assert torch.equal(ep_layer.stats.route_mask, ref.stats.route_mask), key
    return out


def test_inference_rules_with_sharded_experts():
    results = run_distributed(_inference_worker, 2)
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["errs"].items() if v > 0}
        assert not bad, (rank, bad)
        assert r["counts"]["1:dynamic"][1] == 0 and r["counts"]["3:independent"][1] == 0
        assert sum(r["counts"]["4:independent"]) == 0
    # per-expert counts differ between ranks (uneven splits at inference)
    assert results[0]["counts"] != results[1]["counts"]


# ----------------------------------------------------------------------------------------------------
# Whole model: several optimizer steps give the same losses on 1 process and on N ranks.
def _train(
    cfg, world: int, rank: int, steps: int, reduce: str = "flat", dtype: str = "fp32"
) -> list[float]:
    """reduce "flat": average_gradients after backward; "overlap": GradReducer (DDP + expert
    buckets during backward), small buckets so several all-reduces overlap backward."""
    import torch.distributed as dist

    ps = build_parallel_state(cfg, world, rank)
    torch.manual_seed(0)
    model = parallelize_model(DiffMoE(cfg.model, cfg.moe), ps).train()
    reducer = GradReducer(model, ps, "overlap", dtype, bucket_mb=0.01) if reduce != "flat" else None
    fwd = reducer.module if reducer is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    G, b = cfg.train.global_batch_size, cfg.train.global_batch_size // world
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        x = torch.randn(G, 4, 8, 8, generator=gen)
        t = torch.rand(G, generator=gen)
        y = torch.randint(0, 10, (G,), generator=gen)
        tgt = torch.randn(G, 4, 8, 8, generator=gen)
        sl = slice(rank * b, (rank + 1) * b)
        pred = fwd(x[sl], t[sl], y[sl])
        aux = model.aux_losses()
        loss = ((pred - tgt[sl]) ** 2).mean() + aux["cp_loss"] + 0.01 * aux["balance_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if reducer is not None:
            reducer.finish()
        else:
            average_gradients(model, ps)
        opt.step()
        reduce_thresholds(model, ps)
        report = loss.detach().clone()
        if ps.world_group is not None:
            dist.all_reduce(report, group=ps.world_group)
            report /= world
        losses.append(float(report))
    thr = torch.cat([m.thresholds for m in model.moe_layers()]).tolist()
    return losses + thr


def _model_worker(rank: int, world: int, mode: str, ep: int, G: int, P: int, steps: int) -> dict:
    ref = _train(_cfg(mode, 1, G, P), 1, 0, steps)
    dist_run = _train(_cfg(mode, ep, G, P), world, rank, steps)
    overlap = _train(_cfg(mode, ep, G, P), world, rank, steps, reduce="overlap")
    return {"ref": ref, "dist": dist_run, "overlap": overlap}


@pytest.mark.parametrize(
    "world,mode,ep,G,P",
    [
        (2, "diffmoe", 2, 4, 4),  # pool spans both ranks
        (2, "tc", 2, 4, 2),  # pools within ranks, token choice
        (2, "diffmoe", 2, 8, 2),  # two pools within each rank under ep 2
        (4, "diffmoe", 2, 8, 4),  # dp 2 x ep 2, pools span 2 ranks
    ],
)
def test_model_loss_curve_matches_single_process(world, mode, ep, G, P):
    steps = 3
    results = run_distributed(
        _model_worker, world, args=(mode, ep, G, P, steps), timeout_s=400 if world == 4 else 200
    )
    for rank, r in enumerate(results):
        ref = torch.tensor(r["ref"])
        for key in ("dist", "overlap"):  # flat reduction after backward; DDP + expert buckets
            got = torch.tensor(r[key])
            # Losses and thresholds: 1e-4 relative; several Adam steps amplify the ~1e-7 rounding.
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6), (rank, key, got.tolist(), ref)


# ----------------------------------------------------------------------------------------------------
def _skip_collective_worker(rank: int, world: int, pg_timeout: float) -> float:
    import torch.distributed as dist

    if rank == 1:
        time.sleep(pg_timeout + 10)  # never joins the all-reduce, stays alive past the timeout
        return 0.0
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(3))
    except RuntimeError:  # gloo: DistBackendError / "Timed out waiting ... for recv operation"
        return time.monotonic() - start
    raise AssertionError("an unmatched all_reduce completed")


def test_unmatched_collective_fails_within_timeout():
    # rank 0 must give up after ~pg_timeout (not hang, not wait for rank 1 to exit); the margin
    # covers a loaded 2-core machine. run_distributed's own timeout_s catches a real hang.
    pg_timeout = 3.0
    waited = run_distributed(
        _skip_collective_worker, 2, args=(pg_timeout,), pg_timeout_s=pg_timeout, timeout_s=120
    )
    assert pg_timeout - 0.5 < waited[0] < pg_timeout + 8, waited


def _raise_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")


def test_dist_utils_propagates_exceptions():
    with pytest.raises(DistributedError, match="boom on rank 1"):
        run_distributed(_raise_worker, 2)


# ----------------------------------------------------------------------------------------------------
# Dispatcher level: plain and dedup_tokens paths against the unsharded experts on the same rows.
def _dispatch_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from diffmoe_dist.models.moe import StackedExperts
    from diffmoe_dist.parallel.dispatch import AllToAllDispatcher

    ep, El, N = world, 2, 12
    Eg = ep * El
    group = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    full = StackedExperts(Eg, D, H)
    gen = torch.Generator().manual_seed(10 + rank)
    xf = torch.randn(N, D, generator=gen)
    mask = torch.rand(N, Eg, generator=gen) < 0.5  # tokens often picked by 2 experts of one rank
    mask[:, 1] = False  # global expert 1 gets nothing from anyone (zero-size splits)
    if rank == world - 1:
        mask[:] = False  # the last rank sends nothing at all
    exp_idx, tok_idx = mask.t().nonzero(as_tuple=True)
    counts = mask.sum(0)
    out: dict = {"errs": {}, "bytes": {}}
    ref_x = xf.clone().requires_grad_()
    full.zero_grad()
    y_ref = full(ref_x[tok_idx], counts)
    y_ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in full.named_parameters()}
    for n in ref_grads:  # the expert slice sees the tokens of every rank
        dist.all_reduce(ref_grads[n], group=group)
    for dedup in (False, True):
        shard = copy.deepcopy(full)
        shard.zero_grad()
        lo = rank * El
        for n in ("w1", "b1", "w2", "b2"):
            setattr(shard, n, torch.nn.Parameter(getattr(full, n).detach()[lo : lo + El].clone()))
        shard.num_experts, shard.expert_offset = El, lo
        d = AllToAllDispatcher(ep, group, layer_id=7, dedup_tokens=dedup)
        x = xf.clone().requires_grad_()
        y = d.run_experts(x[tok_idx], counts, shard, 7, tok_idx=tok_idx)
        y.square().sum().backward()
        out["errs"][f"{dedup}:y"] = _err(y, y_ref)
        out["errs"][f"{dedup}:x_grad"] = _err(x.grad, ref_x.grad)
        for n, p in shard.named_parameters():
            out["errs"][f"{dedup}:{n}.grad"] = _err(p.grad, ref_grads[n][lo : lo + El])
        out["bytes"][dedup] = d.bytes_log[7]
    return out


def test_dispatcher_plain_and_dedup_match_unsharded_experts():
    results = run_distributed(_dispatch_worker, 2)
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["errs"].items() if v > 0}
        assert not bad, (rank, bad)
    (p0, d0), (p1, d1) = [(r["bytes"][False], r["bytes"][True]) for r in results]
    # rank 0 sends tokens chosen by both experts of rank 1 once (+ a 4-byte slot per pair)
    assert d0["index_sent"] > 0 and d0["tokens_sent"] < p0["tokens_sent"], (p0, d0)
    # rank 1 sends no tokens: only the per-pair return leg, identical with or without dedup
    assert d1["index_sent"] == 0 and d1["tokens_sent"] == p1["tokens_sent"] > 0, (p1, d1)
