"""The planner against a measured step: ``plan()`` calibrated on this machine, predicting bench_step.

For each DiffMoE case of a ``tools/bench_step.py --json`` result (W gloo ranks, ep = W, one pool per
rank) the SAME ``planner.plan`` formula is evaluated with the W local ranks taken as one node of W
"GPUs" (so every byte goes over the in-node link, ``Links.nvlink_gbps``) and with:

Links  measured here with real gloo collectives on W ranks (``measure_links``): the all-reduce's bus
       bandwidth 2 (W-1)/W x bytes / (time - latency) of a ``nbytes`` buffer, the latency of a
       one-element all-reduce. The planner has one in-node bandwidth for the all-to-all and the
       all-reduce; it takes the all-reduce's (the gradient sync is the larger volume here: with ep = W
       the tokens of 6 MoE layers are 38-57 MB a step (fp32) against 107 MB of dense gradients for S). The
       all-to-all's own bandwidth is measured too and printed next to it.
Rates  one FLOP/s for dense parts and MoE FFNs alike, per rank, either
       ``peak``      the matmul peak bench_step measured on each rank in the same run
                     (tflops_per_rank / mfu_vs_measured_peak): the planner as it is used for a GPU,
                     compute only;
       ``one-rank``  the 1-process case of the same model and images per rank:
                     rate = plan's FLOPs / measured step time, divided by W (W ranks share the
                     machine's cores: bench_step gives each rank cores / W threads). This folds what
                     the planner does not model (optimizer, EMA, threshold update, batch and noise,
                     Python overhead, the host syncs of telemetry) into the rate, as a term
                     proportional to the compute.
Skew   plan()'s ``rank_noise`` sigma (waiting for the slowest rank: cost_model, "Rank skew"), one of
       ``none``      ranks in lockstep (the planner before the skew term);
       ``per-rank``  from this case's own per-rank busy times (busy = step - exposed): the median
                     over repeats of max over ranks / mean over ranks - 1 is the whole step's skew,
                     e(W) sigma / sqrt(sync_points) in the model, so sigma = that x
                     sqrt(sync_points) / e(W). It reads the same run, but not its exposed time's
                     size: a lockstep model would predict exactly this step-level skew as the wait;
       ``cross``     sigma from the same model and variant at another rank count (per-rank there),
                     the prediction of this case's waiting from a different run: the 2-rank case
                     predicts the 4-rank one and back;
       ``one-rank``  sigma = the 1-process case's repeat-to-repeat spread, IQR / 1.349 / median
                     (a normal's standard deviation from its interquartile range), x sqrt of the
                     sync points: how much one process's step varies under this load. It mostly
                     measures slow load swings that hit all ranks alike (no waiting), so it
                     over-predicts; kept to show that.
Predicted exposed communication = plan's all-to-all + exposed gradient sync + skew; measured = the
mean over ranks of each rank's median exposed time when the case has ``per_rank`` (the slowest rank
waits least, so rank 0 alone is biased), else ``exposed_comm_ms`` (rank 0's median); both also hold
the threshold and grad-norm all-reduces (a few latencies). Not modelled at all: CPU contention
between gloo's threads and compute (on a 2-core machine the "overlapped" reduction competes with
backward for the same cores), and Dense-DiT cases (the planner models DiffMoE only; they are
skipped with a reason).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

from diffmoe_dist.planner.cost_model import MODELS, Links, Rates, expected_max_normal, plan

CALIBRATIONS = ("peak", "one-rank")
SKEWS = ("none", "per-rank", "cross", "one-rank")
IQR_PER_SIGMA = 1.349  # interquartile range of a normal distribution, in standard deviations


def _overrides(case: dict) -> dict[str, str]:
    out = {}
    for o in case.get("overrides") or []:
        k, _, v = str(o).partition("=")
        out[k.strip()] = v.strip()
    return out


def _plan_case(
    case: dict, links: Links, rate: float, elem_bytes: int, rank_noise: float = 0.0
) -> Any:
    """plan() for one bench_step case: one node of ``ranks`` GPUs, pool = images per rank."""
    ov = _overrides(case)
    W, img = int(case["ranks"]), int(case["images_per_rank"])
    accum = int(ov.get("train.grad_accum_steps", 1))
    return plan(
        case["model"],
        nodes=1,
        gpus_per_node=W,
        ep=int(case["ep"]),
        global_batch=img * W,
        # bench_step's pool is the rank's images unless overridden (accumulation needs a pool
        # inside a micro-batch: --set moe.pool_samples=...)
        pool_samples=int(ov.get("moe.pool_samples", img // accum if accum > 1 else img)),
        links=links,
        rates=Rates(rate, rate, "calibrated"),
        elem_bytes=elem_bytes,
        overlap=ov.get("train.grad_reduce", "overlap") != "flat",
        grad_reduce_dtype=ov.get("train.grad_reduce_dtype", "fp32"),
        accum=accum,
        bucket_mb=float(ov.get("train.grad_bucket_mb", 25.0)),
        rank_noise=rank_noise,
    )


def _one_rank_case(cases: list[dict], c: dict) -> dict | None:
    """The 1-process case of ``c``'s model and images (same variant first, else any variant)."""
    same = [
        o
        for o in cases
        if int(o["ranks"]) == 1
        and o["model"] == c["model"]
        and o["images_per_rank"] == c["images_per_rank"]
    ]
    variant = c.get("variant", "default")
    return next((o for o in same if o.get("variant", "default") == variant), None) or (
        same[0] if same else None
    )


def per_rank_skew(case: dict) -> float:
    """Median over repeats of (max over ranks / mean over ranks of busy = step - exposed) - 1."""
    ranks = case.get("per_rank")
    if not ranks or len(ranks) < 2:
        raise ValueError("no per_rank times (a bench_step.py --json result before the skew check)")
    skews = []
    for r in range(min(len(pr["ms"]) for pr in ranks)):
        busy = [pr["ms"][r] - pr["exposed_ms"][r] for pr in ranks]
        skews.append(max(busy) / statistics.mean(busy) - 1)
    return statistics.median(skews)


def _rank_noise(skew: str, c: dict, cases: list[dict], sync_points: int) -> float:
    """sigma of plan()'s skew term for case ``c`` (module docstring, "Skew")."""
    W = int(c["ranks"])
    if skew == "none":
        return 0.0
    if skew == "per-rank":
        return per_rank_skew(c) * math.sqrt(sync_points) / expected_max_normal(W)
    if skew == "cross":
        others = [
            o
            for o in cases
            if int(o["ranks"]) > 1
            and int(o["ranks"]) != W
            and o["model"] == c["model"]
            and o["images_per_rank"] == c["images_per_rank"]
            and o.get("variant", "default") == c.get("variant", "default")
            and o.get("per_rank")
        ]
        if not others:
            raise ValueError("no case of the same model, images and variant at another rank count")
        o = min(others, key=lambda o: abs(int(o["ranks"]) - W))
        return per_rank_skew(o) * math.sqrt(sync_points) / expected_max_normal(int(o["ranks"]))
    one = _one_rank_case(cases, c)
    if one is None or "ms_spread" not in one:
        raise ValueError(f"needs a ranks=1 case of {c['model']} with ms_spread (--ranks 1,{W})")
    return one["ms_spread"] / IQR_PER_SIGMA / one["ms_median"] * math.sqrt(sync_points)


def measured_exposed_ms(case: dict) -> float:
    """Mean over ranks of each rank's median exposed time (rank 0's median without per_rank)."""
    if case.get("per_rank"):
        return statistics.mean(statistics.median(pr["exposed_ms"]) for pr in case["per_rank"])
    return case.get("exposed_comm_ms", case["exposed_comm_frac"] * case["ms_median"])


def _unsupported(case: dict) -> str | None:
    if case.get("model") not in MODELS:
        return f"model {case.get('model')!r}: the planner models the registry's DiffMoE-* only"
    bad = [
        k
        for k in _overrides(case)
        if k.startswith(("model.", "moe.")) and k not in ("moe.grouped_mm", "moe.pool_samples")
    ]
    if bad:
        return f"overrides {bad} change the model away from the planner's {case['model']}"
    return None


def check_bench(
    bench: dict,
    links_by_world: dict[int, Links],
    calibration: str = "peak",
    elem_bytes: int = 4,
    source: str = "bench JSON",
    skew: str = "per-rank",
) -> dict[str, Any]:
    """Predicted vs measured step and exposed communication of every DiffMoE case of ``bench``.

    ``skew``: how plan()'s rank_noise is set (module docstring, SKEWS); every row also holds the
    lockstep prediction (``pred_exposed_lockstep_ms``) for a before/after from the same run.

    ``links_by_world``: the Links measured on W ranks, for every W of a multi-rank case.
    ``elem_bytes``: bytes per activation element of the run (4 for bench_step's CPU fp32 default).
    Returns {"calibration", "rows": [...], "skipped": [...]}; ValueError naming ``source`` on bad
    input (no cases, a case without the keys the check reads, no 1-rank case for ``one-rank``).
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration={calibration!r}; expected one of {CALIBRATIONS}")
    if skew not in SKEWS:
        raise ValueError(f"skew={skew!r}; expected one of {SKEWS}")
    cases = bench.get("cases") if isinstance(bench, dict) else None
    if not cases or not isinstance(cases, list):
        raise ValueError(
            f"{source}: no 'cases' (expected the output of tools/bench_step.py --json)"
        )
    need = ("model", "ranks", "ep", "images_per_rank", "ms_median", "exposed_comm_frac")
    for i, c in enumerate(cases):
        miss = [k for k in need if not isinstance(c, dict) or k not in c]
        if miss:
            raise ValueError(f"{source}: case {i} has no {miss} (not a bench_step.py --json case)")
    rows, skipped = [], []
    for c in cases:
        W = int(c["ranks"])
        label = f"{c['model']} {c.get('variant', 'default')} ranks={W} img={c['images_per_rank']}"
        if why := _unsupported(c):
            skipped.append(f"{label}: {why}")
            continue
        if W < 2:
            continue  # no communication to predict (and it is the one-rank calibration)
        if W not in links_by_world:
            skipped.append(f"{label}: no links measured on {W} ranks")
            continue
        if calibration == "peak":
            if not c.get("mfu_vs_measured_peak") or "tflops_per_rank" not in c:
                raise ValueError(f"{source}: {label} has no tflops_per_rank / mfu_vs_measured_peak")
            rate = c["tflops_per_rank"] * 1e12 / c["mfu_vs_measured_peak"]
            rsrc = f"matmul peak {rate / 1e9:.1f} GFLOP/s per rank"
        else:
            one = _one_rank_case(cases, c)
            if one is None:
                raise ValueError(
                    f"{source}: calibration one-rank needs a ranks=1 case of {c['model']} at "
                    f"{c['images_per_rank']} images (run bench_step with --ranks 1,{W})"
                )
            flops_ms = _plan_case(one, Links(), 1e3, elem_bytes).compute_ms  # = FLOPs at 1 FLOP/ms
            r1 = flops_ms / one["ms_median"] * 1e3
            rate = r1 / W
            rsrc = f"1-rank step: {r1 / 1e9:.1f} GFLOP/s effective / {W} ranks"
        sync_points = _plan_case(c, links_by_world[W], rate, elem_bytes).sync_points
        try:
            noise = _rank_noise(skew, c, cases, sync_points)
        except ValueError as e:
            if skew == "cross":  # a case measured at one rank count only: nothing to cross with
                skipped.append(f"{label}: skew cross: {e}")
                continue
            raise ValueError(f"{source}: {label}: skew {skew}: {e}") from None
        p = _plan_case(c, links_by_world[W], rate, elem_bytes, noise)
        exp_ms = measured_exposed_ms(c)
        pred_exp = p.a2a_ms + p.grad_sync_ms + p.skew_ms
        rows.append(
            {
                "model": c["model"],
                "variant": c.get("variant", "default"),
                "overrides": c.get("overrides", []),
                "ranks": W,
                "ep": c["ep"],
                "images_per_rank": c["images_per_rank"],
                "rate_source": rsrc,
                "pred_compute_ms": p.compute_ms,
                "pred_a2a_ms": p.a2a_ms,
                "pred_grad_sync_ms": p.grad_sync_ms,
                "skew": skew,
                "rank_noise": noise,
                "sync_points": sync_points,
                "pred_skew_ms": p.skew_ms,
                "pred_exposed_lockstep_ms": p.a2a_ms + p.grad_sync_ms,
                "pred_step_ms": p.step_ms,
                "meas_step_ms": c["ms_median"],
                "step_rel_err": p.step_ms / c["ms_median"] - 1,
                "pred_exposed_ms": pred_exp,
                "meas_exposed_ms": exp_ms,
                "exposed_rel_err": pred_exp / exp_ms - 1 if exp_ms > 0 else None,
                "pred_exposed_frac": pred_exp / p.step_ms,
                "meas_exposed_frac": c["exposed_comm_frac"],
            }
        )
    if not rows and not (skew == "cross" and skipped):  # cross: each case may lack a partner
        raise ValueError(f"{source}: no DiffMoE case on 2 or more ranks to check ({skipped})")
    return {"calibration": calibration, "skew": skew, "rows": rows, "skipped": skipped}


# ---------------------------------------------------------------------------------------------------
def _links_rank(rank: int, world: int, port: int, nbytes: int, reps: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        big = torch.ones(nbytes // 4)
        tiny = torch.ones(1)
        recv = torch.empty_like(big)

        def timed(fn: Any) -> float:
            fn()  # warm-up (connections, buffers)
            ts = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        lat = timed(lambda: [dist.all_reduce(tiny) for _ in range(10)]) / 10
        ar = timed(lambda: dist.all_reduce(big))
        a2a = timed(lambda: dist.all_to_all_single(recv, big))
        if rank == 0:
            out.put({"latency_s": lat, "allreduce_s": ar, "a2a_s": a2a})
    finally:
        dist.destroy_process_group()


def measure_links(world: int, nbytes: int = 32 * 2**20, reps: int = 3) -> tuple[Links, dict]:
    """Links of ``world`` local gloo ranks from real collectives (module docstring); and the raw
    times with the all-to-all's bandwidth."""
    import socket

    import torch.multiprocessing as mp

    if world < 2:
        raise ValueError(f"world={world}: links need >= 2 ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_links_rank, args=(r, world, port, nbytes, reps, q))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        raw = q.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(
            f"gloo link measurement on {world} ranks failed: exit codes "
            f"{[p.exitcode for p in procs]}"
        )
    lat = raw["latency_s"]
    frac = (world - 1) / world
    ar_gbps = 2 * frac * nbytes / max(raw["allreduce_s"] - lat, 1e-9) / 1e9
    a2a_gbps = frac * nbytes / max(raw["a2a_s"] - lat, 1e-9) / 1e9
    raw.update(world=world, nbytes=nbytes, allreduce_gbps=ar_gbps, a2a_gbps=a2a_gbps)
    return Links(nvlink_gbps=ar_gbps, ib_gbps=ar_gbps, latency_us=lat * 1e6), raw
