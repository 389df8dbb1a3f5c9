#!/usr/bin/env python
"""Scaling study: run one base config on several layouts, holding the model fixed, and write one
results table (CSV + Markdown) and plots.

    python tools/scaling_study.py --config configs/tiny.yaml --steps 6 \\
        --layouts "nodes=1,nproc=1,ep=1,micro=16; nodes=1,nproc=2,ep=2,micro=8; nodes=1,nproc=4,ep=4,micro=4"
    python tools/scaling_study.py --config configs/imagenet256/diffmoe_l_e16.yaml --launcher slurm \\
        --layouts "nodes=1,nproc=8,ep=8,micro=32; nodes=2,nproc=8,ep=8,micro=16" \\
        --sbatch-arg=--gpus-per-node=8 --sbatch-arg=--time=01:00:00

A layout is nodes, nproc (ranks per node), ep, micro (samples per rank per step); global batch =
nodes*nproc*micro. Every layout must keep moe.pool_samples and the global batch of the first
layout (else the sweep is refused before anything runs, naming the layout; --weak-scaling lets
the global batch grow). A run that fails is recorded as failed and the sweep goes on.

Outputs under --out (default runs/scaling): results.csv, results.md, results.json, scaling.png,
loss_curves.png, runs/<layout>/ (each run's metrics.jsonl, checkpoints) and runs/<layout>.log.
Exit code: 0 when every layout ran, 1 when some failed, 2 when the sweep was refused.
See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffmoe_dist.studies.scaling_study import (  # noqa: E402
    finish_table,
    local_command,
    parse_layouts,
    plan_sweep,
    plot_study,
    prepare_run_dir,
    run_one,
    slurm_command,
    summarize_run,
    write_table,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="base config (YAML)")
    p.add_argument("--layouts", required=True, help='"nodes=1,nproc=1,ep=1,micro=16; ..."')
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--steps", type=int, help="training steps per layout (default: the config's)")
    p.add_argument("--out", type=Path, default=Path("runs/scaling"))
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every layout (the model may change here: it does for all)",
    )
    p.add_argument("--warmup", type=int, default=1, help="logged steps left out of timings (1)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run (3600)")
    p.add_argument(
        "--weak-scaling",
        action="store_true",
        help="allow the global batch to differ between layouts (pool still fixed)",
    )
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra sbatch argument, e.g. --sbatch-arg=--gpus-per-node=8",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing run directories")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)

    try:
        layouts = parse_layouts(args.layouts)
        plans = plan_sweep(
            args.config,
            layouts,
            args.out.resolve(),
            args.overrides,
            args.steps,
            args.launcher,
            args.weak_scaling,
        )
        if not args.dry_run:
            for plan in plans:
                prepare_run_dir(plan, args.overwrite)
    except (ValueError, OSError) as e:
        print(f"scaling_study: refused: {e}", file=sys.stderr)
        return 2

    rows = []
    for plan in plans:
        lay = plan.layout
        if args.launcher == "local":
            cmd, env = local_command(plan, args.config), {}
            if "OMP_NUM_THREADS" not in os.environ:  # ranks share this machine's cores
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // lay.world))
        else:
            cmd, env = slurm_command(plan, args.config, args.sbatch_arg)
        if args.dry_run:
            prefix = " ".join(f"{k}={v}" for k, v in env.items())
            print(f"{prefix} {' '.join(cmd)}".strip())
            continue
        print(f"scaling_study: {lay.describe()} -> {plan.run_dir}", flush=True)
        rc, wall, err = run_one(cmd, env, plan.run_dir.with_suffix(".log"), args.timeout)
        row = summarize_run(plan, args.warmup)
        ok = rc == 0 and (plan.run_dir / "final.json").is_file()
        row.update(status="ok" if ok else "failed", returncode=rc, wall_s=round(wall, 1))
        if not ok:
            row["error"] = err or "no final.json"
            print(f"scaling_study: {lay.describe()} FAILED (rc {rc}): {row['error']}", flush=True)
        rows.append(row)
    if args.dry_run:
        return 0
    finish_table(rows)
    csv_path, md_path = write_table(rows, args.out)
    plot_study(rows, args.out)
    print(md_path.read_text())
    print(f"scaling_study: wrote {csv_path}, {md_path}, {args.out / 'scaling.png'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
