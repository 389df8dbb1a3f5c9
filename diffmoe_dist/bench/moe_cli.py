"""The command line of tools/bench_moe.py: forward+backward time of one MoE layer per routing mode vs a dense FFN and two slow references.

    python tools/bench_moe.py                      # table, widths 384,768, E8/E16, 2048..16384 tokens
    python tools/bench_moe.py --quick --json       # width 384, E16, 2048 and 8192 tokens, 3 repeats
    python tools/bench_moe.py --device cuda --dtype bf16 --json > bench.json   # adds tflops, mfu
    python tools/bench_moe.py --table a.json b.json   # print saved --json results as one table
    python tools/bench_moe.py --profile --widths 384 --experts 16 --tokens 8192 --modes diffmoe

What is measured and how: diffmoe_dist/bench/moe_bench.py (module docstring) and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from diffmoe_dist.bench.common import parse_ints
from diffmoe_dist.bench.moe_bench import (
    MOE_MODES,
    bench_shape,
    profile_shape,
    validate_result,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    """tools/bench_moe.py: run (or print saved results), exit status 0."""
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, time the shapes (or merge ``--table`` files, or profile), print; the result."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the JSON result only")
    ap.add_argument(
        "--quick", action="store_true", help="width 384, E16, 2048,8192 tokens, 3 repeats"
    )
    ap.add_argument("--widths", default="384,768")
    ap.add_argument("--experts", default="8,16")
    ap.add_argument("--tokens", default="2048,8192,16384", help="pool sizes (256 tokens per image)")
    ap.add_argument("--modes", default=",".join(MOE_MODES))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="print the table of saved --json results (one device), run nothing",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler tables (dense and each mode, first width/experts/tokens), "
        "no timing table",
    )
    args = ap.parse_args(argv)
    if args.table:
        return table_from_files(args.table)
    if args.quick:
        args.widths, args.experts, args.tokens, args.repeats = "384", "16", "2048,8192", 3
    widths, experts = parse_ints(args.widths, "widths"), parse_ints(args.experts, "experts")
    tokens = parse_ints(args.tokens, "tokens")
    modes = tuple(m for m in args.modes.split(",") if m)
    if bad := [m for m in modes if m not in MOE_MODES]:
        raise SystemExit(f"--modes: unknown {bad}; expected a subset of {MOE_MODES}")
    if bad := [n for n in tokens if n % 256]:
        raise SystemExit(f"--tokens {bad}: must be multiples of 256 (tokens per image)")
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    if args.profile:
        d, e, n = widths[0], experts[0], tokens[0]
        tables = profile_shape(d, e, n, modes, args.device, DTYPES[args.dtype])
        for impl, table in tables.items():
            print(f"== {impl}  D={d} E={e} tokens={n} ({name}, {args.dtype})\n{table}")
        return tables
    cases: list[dict] = []
    for d in widths:
        for e in experts:
            for n in tokens:
                cases += bench_shape(
                    d, e, n, args.device, DTYPES[args.dtype], args.repeats, modes, device_name=name
                )
                if not args.json:
                    print(f"  done D={d} E={e} N={n}", file=sys.stderr, flush=True)
    result = {"device": f"{name}, {args.dtype}", "cases": cases}
    validate_result(result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return result


def table_from_files(paths: list[str]) -> dict:
    """Merge saved results (same device) and print them as one table."""
    results = []
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
            validate_result(r)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--table {p}: {e}") from e
        results.append(r)
    devices = {r["device"] for r in results}
    if len(devices) > 1:
        raise SystemExit(f"--table: results from different devices {sorted(devices)}")
    merged = {"device": results[0]["device"], "cases": [c for r in results for c in r["cases"]]}
    print_table(merged)
    return merged


def print_table(result: dict) -> None:
    gpu = any("tflops" in c for c in result["cases"])
    head = f"{'mode':8} {'D':>4} {'E':>3} {'tokens':>6} {'ms':>9} {'iqr':>7} {'MB':>8} "
    head += f"{'x dense':>7} {'floor':>6} {'vs loop':>7} {'vs l+buf':>8}"
    head += f" {'TFLOP/s':>8} {'MFU':>6}" if gpu else ""
    print(f"device: {result['device']}\n{head}")
    for c in result["cases"]:

        def f(v, w, p=2):
            return f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

        row = f"{c['mode']:8} {c['width']:>4} {c['experts']:>3} {c['tokens']:>6} "
        row += f"{f(c['ms_median'], 9, 1)} {f(c['ms_spread'], 7, 1)} {f(c['peak_mem_mb'], 8, 1)} "
        row += f"{f(c['ratio_vs_dense'], 7)} {f(c.get('flop_floor'), 6, 3)} "
        row += f"{f(c.get('speedup_vs_loop'), 7)} {f(c['speedup_vs_loop_buffer'], 8)}"
        if gpu:
            row += f" {f(c.get('tflops'), 8, 1)} {f(c.get('mfu'), 6, 3)}"
        print(row)
