"""The command line of tools/plan_cluster.py: predicted step time, all-to-all share, rank skew and
memory per GPU of DiffMoE layouts, the recommended one; or the check against a measured step.

    python tools/plan_cluster.py                                   # L-E16 and XL-E16, 1..8 nodes
    python tools/plan_cluster.py --bench bench.json --nodes 4,8 --ib-gbps 25 --json
    python tools/plan_cluster.py --models DiffMoE-L-E8 --ep 2,4,8 --global-batch 1024
    python tools/plan_cluster.py --grad-reduce flat       # the reduction after backward (no overlap)
    python tools/plan_cluster.py --grad-reduce-dtype bf16 --accum 2
    python tools/plan_cluster.py --rank-noise 0.02        # ranks' compute varies 2%: skew term
    python tools/plan_cluster.py --check-bench step.json   # predicted vs measured bench_step cases

The model (FLOP counts, byte counts, link and memory assumptions) is in diffmoe_dist/planner/cost_model.py.
Without --bench the compute rate is 40% of an H100's bf16 peak; with --bench it is what
tools/bench_moe.py --json measured (calibrate on the target GPU, not on a CPU, for real predictions).
--check-bench takes a tools/bench_step.py --json result, measures this machine's gloo links on 2 and
4 ranks (or takes --link-gbps / --link-latency-us), and prints the same plan() formula's prediction
of each multi-rank DiffMoE case against the measurement (diffmoe_dist/planner/check.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from diffmoe_dist.bench.common import parse_ints
from diffmoe_dist.planner.cost_model import MODELS, Links, Rates, calibrate, plan, recommend


def main(argv: list[str] | None = None) -> int:
    """tools/plan_cluster.py: print the plans (or the check), exit status 0."""
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, plan every (model, nodes, ep) or run ``--check-bench``, print; the result."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="DiffMoE-L-E16,DiffMoE-XL-E16", help=", ".join(MODELS))
    ap.add_argument("--nodes", default="1,2,4,8")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--ep", default="1,2,4,8,16", help="expert-parallel degrees to consider")
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--pool-samples", type=int, default=64)
    ap.add_argument("--nvlink-gbps", type=float, default=Links.nvlink_gbps)
    ap.add_argument("--ib-gbps", type=float, default=Links.ib_gbps)
    ap.add_argument("--latency-us", type=float, default=Links.latency_us)
    ap.add_argument("--memory-gb", type=float, default=80.0, help="GPU memory limit")
    ap.add_argument("--bench", help="bench_moe.py --json output to calibrate compute rates")
    ap.add_argument(
        "--grad-reduce",
        default="overlap",
        choices=("overlap", "flat"),
        help="train.grad_reduce: reduction overlapped with backward, or after it",
    )
    ap.add_argument("--grad-reduce-dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--accum", type=int, default=1, help="train.grad_accum_steps")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="train.grad_bucket_mb")
    ap.add_argument(
        "--rank-noise",
        type=float,
        default=0.0,
        help="relative std of one rank's compute time: the step waits for the slowest rank at "
        "every collective (0: ranks in lockstep)",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check-bench", metavar="JSON", help="bench_step.py --json result to predict")
    ap.add_argument(
        "--calibration",
        default="both",
        choices=("peak", "one-rank", "both"),
        help="--check-bench compute rate: matmul peak, or the 1-rank step of the same case",
    )
    ap.add_argument(
        "--skew",
        default="per-rank",
        choices=("none", "per-rank", "cross", "one-rank", "all"),
        help="--check-bench rank noise: none (lockstep), the case's own per-rank busy times, "
        "those of the case at another rank count (cross), the 1-rank spread (planner/check.py); "
        "all: each of them, on the same measured links",
    )
    ap.add_argument("--link-gbps", type=float, help="--check-bench: skip measuring gloo links")
    ap.add_argument("--link-latency-us", type=float, default=0.0)
    ap.add_argument("--link-mb", type=float, default=32.0, help="buffer of the link measurement")
    ap.add_argument(
        "--elem-bytes", type=int, default=4, help="--check-bench: activation bytes (4: fp32 run)"
    )
    args = ap.parse_args(argv)
    if args.check_bench:
        return check(args)
    try:
        links = Links(args.nvlink_gbps, args.ib_gbps, args.latency_us)
        rates = Rates()
        if args.bench:
            with open(args.bench) as f:
                rates = calibrate(json.load(f))
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"plan_cluster: {e}") from None
    models = [m for m in args.models.split(",") if m]
    if bad := [m for m in models if m not in MODELS]:
        raise SystemExit(f"--models: unknown {bad}; known: {', '.join(MODELS)}")
    out: dict = {
        "rates": dataclasses.asdict(rates),
        "links": dataclasses.asdict(links),
        "plans": [],
    }
    out["skipped"], out["recommended"] = [], {}
    for model in models:
        for nodes in parse_ints(args.nodes, "nodes"):
            plans = []
            for ep in parse_ints(args.ep, "ep"):
                try:
                    plans.append(
                        plan(
                            model,
                            nodes,
                            args.gpus_per_node,
                            ep,
                            args.global_batch,
                            args.pool_samples,
                            links,
                            rates,
                            overlap=args.grad_reduce == "overlap",
                            grad_reduce_dtype=args.grad_reduce_dtype,
                            accum=args.accum,
                            bucket_mb=args.bucket_mb,
                            rank_noise=args.rank_noise,
                        )
                    )
                except ValueError as e:
                    out["skipped"].append(f"{model} nodes={nodes} ep={ep}: {e}")
            out["plans"] += [dataclasses.asdict(p) for p in plans]
            if plans:
                try:
                    best = recommend(plans, args.memory_gb)
                    out["recommended"][f"{model}@{nodes}"] = best.ep
                except ValueError as e:
                    out["skipped"].append(f"{model} nodes={nodes}: {e}")
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print_table(out)
    return out


def check(args: argparse.Namespace) -> dict:
    """--check-bench: predicted vs measured step and exposed communication (diffmoe_dist/planner/check.py)."""
    from diffmoe_dist.planner.check import SKEWS, check_bench, measure_links

    path = args.check_bench
    try:
        with open(path) as f:
            bench = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"plan_cluster: --check-bench {path}: {e}") from None
    cases = bench.get("cases") if isinstance(bench, dict) else None
    if not cases or not isinstance(cases, list):
        raise SystemExit(
            f"plan_cluster: --check-bench {path}: no 'cases' (expected tools/bench_step.py --json)"
        )
    worlds = sorted({int(c["ranks"]) for c in cases if int(c.get("ranks", 1)) > 1})
    out: dict = {"bench": path, "device": bench.get("device"), "links": {}, "checks": []}
    links = {}
    try:
        for w in worlds:
            if args.link_gbps is not None:
                links[w] = Links(args.link_gbps, args.link_gbps, args.link_latency_us)
                out["links"][w] = {"given": dataclasses.asdict(links[w])}
            else:
                links[w], raw = measure_links(w, int(args.link_mb * 2**20))
                out["links"][w] = {"measured": raw, **dataclasses.asdict(links[w])}
        cals = ("peak", "one-rank") if args.calibration == "both" else (args.calibration,)
        skews = SKEWS if args.skew == "all" else (args.skew,)
        for cal in cals:
            for skew in skews:
                try:
                    out["checks"].append(
                        check_bench(
                            bench, links, cal, elem_bytes=args.elem_bytes, source=path, skew=skew
                        )
                    )
                except ValueError as e:
                    if args.skew != "all":
                        raise
                    # --skew all: a calibration this bench cannot give is reported, not fatal
                    out["checks"].append(
                        {"calibration": cal, "skew": skew, "rows": [], "skipped": [str(e)]}
                    )
    except ValueError as e:
        raise SystemExit(f"plan_cluster: {e}") from None
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print_check(out)
    return out


def print_check(out: dict) -> None:
    print(f"bench: {out['bench']} ({out['device']})")
    for w, ln in out["links"].items():
        m = ln.get("measured")
        extra = f", all-to-all {m['a2a_gbps']:.2f} GB/s" if m else ""
        lk = ln.get("given") or ln
        print(
            f"links on {w} ranks: all-reduce bus {lk['nvlink_gbps']:.2f} GB/s, "
            f"latency {lk['latency_us']:.0f} us{extra}"
        )
    for chk in out["checks"]:
        print(f"calibration: {chk['calibration']}, skew: {chk['skew']}")
        print(
            f"{'model':15} {'variant':9} {'ranks':>5} {'compute':>8} {'a2a':>7} {'gsync':>7} "
            f"{'sigma':>6} {'skew':>7} {'pred ms':>8} {'meas ms':>8} {'err':>6} {'lockstep':>8} "
            f"{'pred exp':>8} {'meas exp':>8} {'err':>6}"
        )
        for r in chk["rows"]:
            e2 = r["exposed_rel_err"]
            print(
                f"{r['model']:15} {r['variant']:9} {r['ranks']:>5} {r['pred_compute_ms']:>8.0f} "
                f"{r['pred_a2a_ms']:>7.0f} {r['pred_grad_sync_ms']:>7.0f} "
                f"{100 * r['rank_noise']:>5.1f}% {r['pred_skew_ms']:>7.0f} {r['pred_step_ms']:>8.0f} "
                f"{r['meas_step_ms']:>8.0f} {100 * r['step_rel_err']:>+5.0f}% "
                f"{r['pred_exposed_lockstep_ms']:>8.0f} {r['pred_exposed_ms']:>8.0f} "
                f"{r['meas_exposed_ms']:>8.0f} "
                + (f"{100 * e2:>+5.0f}%" if e2 is not None else "     -")
            )
        for s in chk["skipped"]:
            print(f"skipped: {s}")


def print_table(out: dict) -> None:
    print(f"compute rates: {out['rates']['source']}; links: {out['links']}")
    print(
        f"{'model':15} {'nodes':>5} {'ep':>3} {'micro':>5} {'span':>4} {'compute':>8} {'a2a':>7} "
        f"{'gradsync':>8} {'skew':>6} {'step ms':>8} {'a2a %':>6} {'mem GB':>6}"
    )
    for p in out["plans"]:
        mark = (
            " <- recommended"
            if out["recommended"].get(f"{p['model']}@{p['nodes']}") == p["ep"]
            else ""
        )
        print(
            f"{p['model']:15} {p['nodes']:>5} {p['ep']:>3} {p['micro_batch']:>5} {p['pool_span']:>4} "
            f"{p['compute_ms']:>8.1f} {p['a2a_ms']:>7.2f} {p['grad_sync_ms']:>8.1f} {p['skew_ms']:>6.1f} "
            f"{p['step_ms']:>8.1f} {100 * p['a2a_share']:>6.1f} {p['memory_gb']:>6.1f}{mark}"
        )
    for s in out["skipped"]:
        print(f"skipped: {s}")
