"""The scaling study: one base config trained on several layouts (node counts, ranks per node,
expert-parallel degrees, micro-batches), holding the model fixed, into one results table and plots.

    python tools/scaling_study.py --config configs/tiny.yaml --steps 6 \\
        --layouts "nodes=1,nproc=1,ep=1,micro=16; nodes=1,nproc=2,ep=2,micro=8; nodes=1,nproc=4,ep=4,micro=4"
    python tools/scaling_study.py --config configs/imagenet256/diffmoe_l_e16.yaml --launcher slurm \\
        --layouts "nodes=1,nproc=8,ep=8,micro=32; nodes=2,nproc=8,ep=8,micro=16" \\
        --sbatch-arg=--gpus-per-node=8 --sbatch-arg=--time=01:00:00

A layout is ``nodes=N,nproc=P,ep=E,micro=M`` (world = N*P ranks, micro-batch M per rank, global
batch = world*M). Optional keys: ``pool=S`` (must equal the base config's moe.pool_samples: the pool
is part of the model) and dotted config overrides that do not touch the model (``parallel.*``,
``deepspeed.*``, ``train.precision``), e.g. ``parallel.dedup_tokens=true``.

The model is held fixed across a sweep (DESIGN.md section 2): every layout must realise the same
moe.pool_samples and the same global batch (unless --weak-scaling), checked with
parallel/layout.py's ``layout_from_config`` before anything runs; a sweep that breaks it is refused
(exit 2) with a ValueError naming the layout. A run that fails is recorded as failed and the sweep
goes on (exit 1 at the end).

Outputs under --out (default runs/scaling): results.csv, results.md, results.json, scaling.png,
loss_curves.png, runs/<layout>/ (each run's metrics.jsonl, checkpoints) and runs/<layout>.log.
See docs/scaling.md.

Shape (as every study): ``ScalingSpec`` + ``plan_sweep`` (what to run, every layout checked first),
``run_study`` (the runner: each layout is ``python -m diffmoe_dist.train`` / torchrun here, or
``sbatch --wait launchers/slurm_train.sh`` of the given checkout), scaling_report.py (the report).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmoe_dist.config import Config, load_config
from diffmoe_dist.parallel.layout import Layout, layout_from_config
from diffmoe_dist.studies.common import run_logged, train_command, versions
from diffmoe_dist.studies.scaling_report import summarize_run, write_report

SLURM_SCRIPT = Path("launchers") / "slurm_train.sh"  # inside the checkout given to the study

LAYOUT_KEYS = ("nodes", "nproc", "ep", "micro")
# Per-layout overrides allowed: they change how the model is run, never what it computes.
LAYOUT_OVERRIDE_PREFIXES = ("parallel.", "deepspeed.", "train.precision")


@dataclass(frozen=True)
class SweepPoint:
    """One point of the sweep: where the fixed model runs (not parallel/layout.Layout, the
    resolved degrees of a run, which plan_sweep derives from it)."""

    index: int  # 1-based position in the sweep (for messages)
    nodes: int
    nproc: int  # ranks per node
    ep: int
    micro: int  # samples per rank per step
    pool: int | None = None
    overrides: tuple[str, ...] = ()

    @property
    def world(self) -> int:
        return self.nodes * self.nproc

    @property
    def global_batch(self) -> int:
        return self.world * self.micro

    @property
    def name(self) -> str:
        base = f"n{self.nodes}-p{self.nproc}-ep{self.ep}-m{self.micro}"
        return base + (f"-x{self.index}" if self.overrides else "")

    def describe(self) -> str:
        kv = [f"nodes={self.nodes}", f"nproc={self.nproc}", f"ep={self.ep}", f"micro={self.micro}"]
        kv += [f"pool={self.pool}"] if self.pool is not None else []
        return f"layout {self.index} ({','.join(kv + list(self.overrides))})"


def parse_layouts(text: str) -> list[SweepPoint]:
    """``--layouts "nodes=1,nproc=1,ep=1,micro=16; nodes=1,nproc=2,ep=2,micro=8"`` -> points."""
    out: list[SweepPoint] = []
    for i, chunk in enumerate([c for c in text.split(";") if c.strip()], start=1):
        vals: dict[str, int] = {}
        extra: list[str] = []
        for item in [x.strip() for x in chunk.split(",") if x.strip()]:
            if "=" not in item:
                raise ValueError(f"layout {i} ({chunk.strip()}): '{item}' is not key=value")
            key, value = (s.strip() for s in item.split("=", 1))
            if "." in key:
                if not key.startswith(LAYOUT_OVERRIDE_PREFIXES):
                    raise ValueError(
                        f"layout {i} ({chunk.strip()}): override '{key}' would change the model; "
                        f"per-layout overrides may only start with {LAYOUT_OVERRIDE_PREFIXES}"
                    )
                extra.append(f"{key}={value}")
                continue
            if key not in (*LAYOUT_KEYS, "pool"):
                raise ValueError(
                    f"layout {i} ({chunk.strip()}): unknown key '{key}'; expected "
                    f"{', '.join(LAYOUT_KEYS)}, pool or a parallel.* override"
                )
            try:
                vals[key] = int(value)
            except ValueError:
                raise ValueError(f"layout {i}: {key}={value!r} is not an integer") from None
            if vals[key] < 1:
                raise ValueError(f"layout {i}: {key}={vals[key]} must be >= 1")
        missing = [k for k in LAYOUT_KEYS if k not in vals]
        if missing:
            raise ValueError(f"layout {i} ({chunk.strip()}): missing {', '.join(missing)}")
        out.append(SweepPoint(i, **vals, overrides=tuple(extra)))  # type: ignore[arg-type]
    if not out:
        raise ValueError("--layouts is empty")
    return out


@dataclass
class PlannedRun:
    point: SweepPoint
    cfg: Config
    overrides: list[str]  # --set items for the trainer (run.dir excluded)
    run_dir: Path
    layout: Layout  # the run's resolved degrees (parallel/layout.py), checked while planning


def plan_sweep(
    config: str | os.PathLike[str],
    layouts: list[SweepPoint],
    out: Path,
    base_overrides: list[str] | None = None,
    steps: int | None = None,
    launcher: str = "local",
    weak_scaling: bool = False,
) -> list[PlannedRun]:
    """Resolve and check every layout before anything runs; ValueError names the first bad layout."""
    if launcher not in ("local", "slurm"):
        raise ValueError(f"--launcher {launcher!r}; expected local or slurm")
    base_overrides = list(base_overrides or [])
    base = load_config(config, base_overrides)
    P = base.moe.pool_samples
    G0 = layouts[0].global_batch
    plans = []
    for lay in layouts:
        where = lay.describe()
        if lay.pool is not None and lay.pool != P:
            raise ValueError(
                f"{where} asks for pool_samples={lay.pool} but the base config has "
                f"moe.pool_samples={P}: the pool is part of the model, a sweep must keep it fixed"
            )
        if not weak_scaling and lay.global_batch != G0:
            raise ValueError(
                f"{where} has global batch {lay.world}x{lay.micro}={lay.global_batch}, but "
                f"{layouts[0].describe()} has {G0}: the model (batch semantics) would change "
                "across the sweep; make world x micro equal, or pass --weak-scaling"
            )
        if launcher == "local" and lay.nodes != 1:
            raise ValueError(
                f"{where}: nodes={lay.nodes} needs --launcher slurm (local runs one node)"
            )
        if base.moe.mode != "dense" and base.moe.num_experts % lay.ep:
            raise ValueError(
                f"{where}: ep={lay.ep} does not divide moe.num_experts={base.moe.num_experts}"
            )
        n_steps = steps if steps is not None else base.train.steps
        ov = base_overrides + [
            f"parallel.ep={lay.ep}",
            f"train.global_batch_size={lay.global_batch}",
            f"train.steps={n_steps}",
            "train.log_every=1",
            f"train.ckpt_every={n_steps}",
            "run.progress=false",
            *lay.overrides,
        ]
        try:
            cfg = load_config(config, ov)
            layout = layout_from_config(cfg, lay.world)
        except ValueError as e:
            raise ValueError(f"{where} cannot realise the model: {e}") from None
        if cfg.moe.pool_samples != P:
            raise ValueError(f"{where} changes moe.pool_samples {P} -> {cfg.moe.pool_samples}")
        plans.append(PlannedRun(lay, cfg, ov, out / "runs" / lay.name, layout))
    names = [p.point.name for p in plans]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"layouts repeat: {sorted(dup)}")
    return plans


# ----------------------------------------------------------------------------------------------------
# commands


def local_command(plan: PlannedRun, config: str | os.PathLike[str]) -> list[str]:
    """One node: ``python -m diffmoe_dist.train`` (1 rank) or torchrun --standalone (several)."""
    return train_command(config, [f"run.dir={plan.run_dir}", *plan.overrides], plan.point.world)


def slurm_command(
    plan: PlannedRun,
    config: str | os.PathLike[str],
    checkout: Path,
    sbatch_args: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """``sbatch --wait`` of ``checkout``'s launchers/slurm_train.sh with its knobs (CONFIG, RUN_DIR,
    NPROC_PER_NODE, REPO_DIR) in the environment; returns (command, environment additions). The
    script adds run.dir itself."""
    pt = plan.point
    cmd = [
        "sbatch",
        "--wait",  # block until the job ends; exit code = the job's
        f"--nodes={pt.nodes}",
        f"--job-name=scale-{pt.name}",
        f"--output={plan.run_dir}.slurm-%j.out",
        *(sbatch_args or []),
        str(checkout / SLURM_SCRIPT),
        *[a for item in plan.overrides for a in ("--set", item)],
    ]
    env = {
        "CONFIG": str(Path(config).resolve()),
        "RUN_DIR": str(plan.run_dir),
        "NPROC_PER_NODE": str(pt.nproc),
        "REPO_DIR": str(checkout),
    }
    return cmd, env


def prepare_run_dir(plan: PlannedRun, overwrite: bool) -> None:
    """A run of the study starts from nothing: an existing run dir would be *resumed* by the trainer."""
    d = plan.run_dir
    if d.exists() and any(d.iterdir()):
        if not overwrite:
            raise ValueError(
                f"{d} exists and is not empty (the trainer would resume it); pass --overwrite "
                "or choose another --out"
            )
        shutil.rmtree(d)


# ----------------------------------------------------------------------------------------------------
# spec and runner


@dataclass
class ScalingSpec:
    """One scaling study; the command line maps onto it. Paths are taken as given (absolute after
    ``__post_init__``); nothing is looked up inside a repository."""

    config: Path  # the base config (YAML)
    points: list[SweepPoint]
    out: Path = Path("runs/scaling")
    overrides: tuple[str, ...] = ()  # --set for every layout (may change the model: for all)
    steps: int | None = None  # None: the config's train.steps
    launcher: str = "local"  # local | slurm
    weak_scaling: bool = False
    warmup: int = 1  # logged steps left out of the timings
    timeout_s: float = 3600.0  # per run
    sbatch_args: tuple[str, ...] = ()
    overwrite: bool = False
    checkout: Path | None = None  # slurm: the repository whose launchers/slurm_train.sh submits
    log: Callable[[str], None] = field(default=print, repr=False)

    def __post_init__(self) -> None:
        self.config, self.out = Path(self.config).resolve(), Path(self.out).resolve()
        if self.launcher == "slurm":
            self.checkout = Path(self.checkout or Path.cwd()).resolve()
            if not (self.checkout / SLURM_SCRIPT).is_file():
                raise ValueError(
                    f"--launcher slurm submits {SLURM_SCRIPT} of the repository checkout, and "
                    f"{self.checkout} has none: run from the repository root, or use "
                    "tools/scaling_study.py (it passes its own checkout)"
                )
        if self.warmup < 0 or self.timeout_s <= 0:
            raise ValueError(f"--warmup {self.warmup} must be >= 0, --timeout {self.timeout_s} > 0")

    def plan(self) -> list[PlannedRun]:
        return plan_sweep(
            self.config,
            self.points,
            self.out,
            list(self.overrides),
            self.steps,
            self.launcher,
            self.weak_scaling,
        )

    def command(self, plan: PlannedRun) -> tuple[list[str], dict[str, str]]:
        """The command that runs one layout and the environment it adds."""
        if self.launcher == "slurm":
            assert self.checkout is not None  # __post_init__
            return slurm_command(plan, self.config, self.checkout, list(self.sbatch_args))
        env = {}
        if "OMP_NUM_THREADS" not in os.environ:  # the ranks share this machine's cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.point.world))
        return local_command(plan, self.config), env


def run_study(spec: ScalingSpec, plans: list[PlannedRun]) -> list[dict[str, Any]]:
    """Run every planned layout, one after another; one row per layout, failed ones included."""
    rows = []
    for plan in plans:
        pt = plan.point
        cmd, env = spec.command(plan)
        spec.log(f"scaling_study: {pt.describe()} -> {plan.run_dir}")
        res = run_logged(cmd, plan.run_dir.with_suffix(".log"), env, spec.timeout_s)
        row = summarize_run(plan, spec.warmup)
        ok = res.returncode == 0 and (plan.run_dir / "final.json").is_file()
        row.update(
            status="ok" if ok else "failed", returncode=res.returncode, wall_s=round(res.wall_s, 1)
        )
        if not ok:
            row["error"] = res.error or "no final.json"
            spec.log(f"scaling_study: {pt.describe()} FAILED (rc {res.returncode}): {row['error']}")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scaling_study", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None, checkout: Path | None = None) -> int:
    """Exit code: 0 when every layout ran, 1 when some failed, 2 when the sweep was refused.
    ``checkout``: the repository for --launcher slurm (default: the current directory)."""
    args = parse_args(argv)
    try:
        spec = ScalingSpec(
            config=args.config,
            points=parse_layouts(args.layouts),
            out=args.out,
            overrides=tuple(args.overrides),
            steps=args.steps,
            launcher=args.launcher,
            weak_scaling=args.weak_scaling,
            warmup=args.warmup,
            timeout_s=args.timeout,
            sbatch_args=tuple(args.sbatch_arg),
            overwrite=args.overwrite,
            checkout=checkout,
            log=lambda msg: print(msg, flush=True),
        )
        plans = spec.plan()
        if args.dry_run:
            for plan in plans:
                cmd, env = spec.command(plan)
                print(" ".join([*(f"{k}={v}" for k, v in env.items()), shlex.join(cmd)]))
            return 0
        for plan in plans:
            prepare_run_dir(plan, spec.overwrite)
    except (ValueError, OSError) as e:
        print(f"scaling_study: refused: {e}", file=sys.stderr)
        return 2
    vers = versions()  # at the start: others may commit while the study runs
    rows = run_study(spec, plans)
    md_path = write_report(rows, spec.out, vers)
    print(md_path.read_text())
    print(f"scaling_study: wrote {spec.out / 'results.csv'}, {md_path}, {spec.out / 'scaling.png'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
