"""Reproduce the paper's routing comparison (Table 3) on the embedded digits, with error bars.

Trains Dense-DiT, TC-DiT, EC-DiT and DiffMoE of equal activated compute (one preset config; only
moe.mode differs) for --seeds seeds each, evaluates every run (digits judge FD + accuracy, held-out
loss; DiffMoE under static top-k, the dynamic predictor rule and the batch-independent rule,
with C_infer) and writes docs/reproduction.md (table, paired orderings, command, versions) and
docs/reproduction.png. Hand-written text around the generated section of the .md is kept.

    python tools/reproduce_routing.py                                   # CPU preset, 3 seeds
    python tools/reproduce_routing.py --preset gpu --seeds 5
    python tools/reproduce_routing.py --nproc 2 --ep 2 --modes diffmoe --pool-samples 16,32 --tag pool
      (pools of 64 span both ranks; the sweep gets its own section and reproduction_pool.png)
    python tools/reproduce_routing.py --seeds 1 --steps 50 --modes dense,diffmoe --out /tmp/r
    python tools/reproduce_routing.py --modes diffmoe --experts 2,4,8,16 --tag experts
    python tools/reproduce_routing.py --objective ddpm
      (every model trained with DDPM instead of rectified flow, sampled with DDIM 32 steps; its own
      section "ddpm" and work directory unless --tag / --work-dir say otherwise)
      (the expert-count sweep: DiffMoE with E = 2, 4, 8, 16 at equal activated compute)

--pool-samples P1,P2 adds DiffMoE variants with those pool sizes (equal everything else); the
preset's pool is always the main DiffMoE row. --experts E1,E2 adds DiffMoE variants with those
expert counts (the preset's E is the main row; --ep must divide each). With --nproc N the training runs under torchrun
(gloo on CPU), expert-parallel degree --ep (Dense trains data-parallel: it has no experts).
Evaluation always runs on one process. Finished runs under --work-dir are reused by a rerun with
identical settings.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(_ROOT))

from diffmoe_dist.studies.reproduce_routing import (  # noqa: E402
    MODES,
    PRESETS,
    StudySpec,
    parse_int_list,
    png_name,
    run_study,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="reproduce_routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--config", type=Path, help="use this YAML instead of the preset's")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    p.add_argument("--steps", type=int, help="train.steps (default: the preset's)")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument(
        "--pool-samples", default="", help="extra DiffMoE pool sizes, e.g. 16,128 (the sweep)"
    )
    p.add_argument(
        "--experts", default="", help="extra DiffMoE expert counts, e.g. 2,4,8,16 (the sweep)"
    )
    p.add_argument(
        "--objective",
        choices=("flow", "ddpm"),
        default="flow",
        help="training objective of every variant (ddpm: DiT's DDPM, sampled with DDIM)",
    )
    p.add_argument("--nproc", type=int, default=1, help="training processes per run (torchrun)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree of the MoE runs")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs at a time (default: 2 with --nproc 1, else 1; the CPU box has 2 cores)",
    )
    p.add_argument("--num-samples", type=int, help="judge samples per run (default: preset's)")
    p.add_argument("--sample-steps", type=int, help="sampler steps (default: preset's)")
    p.add_argument("--heldout-samples", type=int, default=512)
    p.add_argument("--out", type=Path, default=_ROOT / "docs", help="reproduction.md/.png go here")
    p.add_argument("--work-dir", type=Path, help="run directories (default: the preset's run.dir)")
    p.add_argument(
        "--tag",
        default="",
        help="name of this study's section in reproduction.md (plot: reproduction_TAG.png), so "
        "e.g. a pool sweep sits beside the main table",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv
    if args.nproc < 1 or args.ep < 1:
        print("reproduce_routing: error: --nproc and --ep must be >= 1", file=sys.stderr)
        return 2
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_-]+", args.tag):
        print(
            f"reproduce_routing: error: --tag {args.tag!r}: letters, digits, - and _ only",
            file=sys.stderr,
        )
        return 2
    config = args.config or PRESETS[args.preset]
    # A DDPM study gets its own runs and doc section by default (a rerun must not replace the flow ones).
    suffix = "" if args.objective == "flow" else f"_{args.objective}"
    work_dir = args.work_dir or _ROOT / "runs" / f"reproduce_{args.preset}{suffix}"
    tag = args.tag or suffix.lstrip("_")
    try:
        spec = StudySpec(
            preset=args.preset,
            config=config.resolve(),
            modes=tuple(m for m in args.modes.split(",") if m),
            seeds=args.seeds,
            steps=args.steps,
            pool_sweep=parse_int_list(args.pool_samples, "--pool-samples"),
            expert_sweep=parse_int_list(args.experts, "--experts"),
            nproc=args.nproc,
            ep=args.ep,
            jobs=args.jobs or (2 if args.nproc == 1 else 1),
            heldout_samples=args.heldout_samples,
            num_samples=args.num_samples,
            sample_steps=args.sample_steps,
            overrides=tuple(args.overrides),
            work_dir=work_dir.resolve(),
            out_dir=args.out.resolve(),
            tag=tag,
            objective=args.objective,
            command=shlex.join(["python", "tools/reproduce_routing.py", *argv_used]),
        )
        rows = run_study(spec)
    except ValueError as e:
        print(f"reproduce_routing: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a training or evaluation subprocess failed: its log tail is in e
        print(f"reproduce_routing: {e}", file=sys.stderr)
        return 1
    for r in rows:
        fd, acc, loss = r.stat("fd"), r.stat("accuracy"), r.stat("heldout_loss")
        print(
            f"{r.label:<40} fd {fd[0]:.3f}±{fd[1]:.3f}  acc {acc[0]:.3f}±{acc[1]:.3f}  "
            f"loss {loss[0]:.4f}±{loss[1]:.4f}  C_infer {r.stat('c_infer')[0]:.3f}"
        )
    print(f"wrote {spec.out_dir / 'reproduction.md'} and {spec.out_dir / png_name(spec.tag)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
