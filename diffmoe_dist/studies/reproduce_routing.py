"""The paper's routing comparison (its Table 3) at small scale on the embedded digits, with error bars.

Variants of EQUAL activated compute share one preset config (configs/reproduce_routing*.yaml) and
differ only in ``moe.mode``: Dense (plain FFN), TC (token choice top-1 + Switch loss), EC (expert
choice within each image), DiffMoE (expert choice over a pool of ``pool_samples`` images), all with
E and C from the preset; extra DiffMoE variants differ only in ``moe.pool_samples`` (the pool sweep)
or only in ``moe.num_experts`` (the expert-count sweep, the paper's E2/E4/E8/E16 at small scale:
activated compute stays that of one dense FFN per token since k = floor(S * C / E)).

    python tools/reproduce_routing.py                                   # CPU preset, 3 seeds
    python tools/reproduce_routing.py --preset gpu --seeds 5
    python tools/reproduce_routing.py --nproc 2 --ep 2 --modes diffmoe --pool-samples 16,32 --tag pool
      (pools of 64 span both ranks; the sweep gets its own section and reproduction_pool.png)
    python tools/reproduce_routing.py --seeds 1 --steps 50 --modes dense,diffmoe --out /tmp/r
    python tools/reproduce_routing.py --modes diffmoe --experts 2,4,8,16 --tag experts
      (the expert-count sweep: DiffMoE with E = 2, 4, 8, 16 at equal activated compute)
    python tools/reproduce_routing.py --objective ddpm
      (every model trained with DDPM instead of rectified flow, sampled with DDIM 32 steps; its own
      section "ddpm" and work directory unless --tag / --work-dir say otherwise)

Shape (as every study): ``RoutingSpec`` (what to run; every variant's layout is resolved and
checked, and activated compute compared, before anything trains), the runner ``run_study``: each
(variant, seed) trains as a subprocess (``python -m diffmoe_dist.train``, or ``torchrun`` with
``--nproc > 1``; ``train.seed`` = data order, init, noise) and is then evaluated in a second one
(``python -m diffmoe_dist.studies.routing_eval``, which documents the metrics: digits judge and
held-out loss, for DiffMoE under static top-k, the dynamic predictor rule and the batch-independent
rule, each with its C_infer), and the report (routing_report.py: the table, the orderings on paired
seeds, the plot, the generated section of reproduction.md).

Inference batches of DiffMoE are exactly one pool (``sample.batch_size = pool_samples``), so static
top-k routes over the same pool size as training. Results land in ``<work_dir>/<variant>/seed<k>/``
(``result.json``); a rerun with the same settings reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmoe_dist.config import Config, load_config, validate_layout
from diffmoe_dist.models.moe import INFER_RULES, ROUTING_MODES
from diffmoe_dist.models.params import count_config_params
from diffmoe_dist.models.registry import FAMILIES
from diffmoe_dist.studies.common import (
    parse_int_list,
    run_logged,
    train_command,
    versions,
    write_json,
)
from diffmoe_dist.studies.routing_report import Row, build_rows, write_report

# The presets, inside the configs directory a caller names (tools/: the checkout's configs/).
PRESET_FILES = {"cpu": "reproduce_routing.yaml", "gpu": "reproduce_routing_gpu.yaml"}
# routing mode -> the paper's model name (Dense-DiT, TC-DiT, EC-DiT, DiffMoE), from the registry
MODEL_NAMES = {mode: family for family, mode in FAMILIES.items()}
# DiffMoE is evaluated under every inference rule but "gamma" (one fixed threshold: the threshold
# sweep's subject, studies/threshold_sweep.py).
DIFFMOE_RULES = tuple(r for r in INFER_RULES if r != "gamma")
# --objective: the presets sample flow models with Heun (16 steps = 32 evaluations); DDPM models
# with DDIM at the same 32 evaluations.
OBJECTIVE_OVERRIDES = {
    "flow": [],
    "ddpm": ["objective=ddpm", "sample.sampler=ddim", "sample.num_steps=32"],
}


# ----------------------------------------------------------------------------------------------------
# spec


@dataclass(frozen=True)
class Variant:
    """One trained model family: a routing mode (and, for DiffMoE, a pool size and expert count)."""

    mode: str
    pool_samples: int
    sweep: bool = False  # an extra pool size of the pool sweep (not the preset's)
    num_experts: int = 0  # > 0: an extra expert count of the expert sweep (not the preset's)

    @property
    def key(self) -> str:
        if self.num_experts:
            return f"diffmoe_e{self.num_experts}"
        return f"diffmoe_p{self.pool_samples}" if self.sweep else self.mode

    @property
    def label(self) -> str:
        name = MODEL_NAMES[self.mode]
        if self.num_experts:
            return f"{name} E={self.num_experts} P={self.pool_samples}"
        return f"{name} P={self.pool_samples}" if self.mode == "diffmoe" else name

    @property
    def rules(self) -> tuple[str, ...]:
        return DIFFMOE_RULES if self.mode == "diffmoe" else ("static",)


@dataclass
class RoutingSpec:
    """Everything that defines a study; the command line maps onto it. Paths are explicit (the
    package looks nothing up in a repository; tools/reproduce_routing.py passes its checkout's)."""

    config: Path  # the preset (configs/reproduce_routing*.yaml) or any config of the digits job
    work_dir: Path  # <work_dir>/<variant>/seed<k>/: the runs, reused by a rerun with equal settings
    out_dir: Path  # reproduction.md (generated section) and its plot
    modes: tuple[str, ...] = ROUTING_MODES
    seeds: int = 3
    steps: int | None = None  # None: the preset's train.steps
    pool_sweep: tuple[int, ...] = ()  # extra DiffMoE pool sizes
    expert_sweep: tuple[int, ...] = ()  # extra DiffMoE expert counts
    objective: str = "flow"  # flow | ddpm (ddpm: sampled with DDIM, DDPM_SAMPLE_STEPS steps)
    nproc: int = 1
    ep: int = 1
    jobs: int = 1  # runs trained/evaluated at the same time
    heldout_samples: int = 512
    num_samples: int | None = None  # None: the preset's sample.num_samples
    sample_steps: int | None = None  # None: the preset's sample.num_steps
    overrides: tuple[str, ...] = ()  # extra --set for every variant
    command: str = ""  # the command line, recorded in the report
    tag: str = ""  # names the generated section (and plot) so several studies share one doc
    log: Callable[[str], None] = field(default=print, repr=False)

    def __post_init__(self) -> None:
        self.config, self.work_dir = Path(self.config).resolve(), Path(self.work_dir).resolve()
        self.out_dir = Path(self.out_dir).resolve()
        for flag, value in (("--seeds", self.seeds), ("--jobs", self.jobs)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.nproc < 1 or self.ep < 1:
            raise ValueError(f"--nproc and --ep must be >= 1, got {self.nproc} and {self.ep}")
        if self.tag and not re.fullmatch(r"[A-Za-z0-9_-]+", self.tag):
            raise ValueError(f"--tag {self.tag!r}: letters, digits, - and _ only")
        if not self.config.is_file():
            raise ValueError(f"config {self.config} does not exist")

    def base_overrides(self) -> list[str]:
        if self.objective not in OBJECTIVE_OVERRIDES:
            raise ValueError(
                f"--objective {self.objective!r}; expected one of {', '.join(OBJECTIVE_OVERRIDES)}"
            )
        # The objective's first, so a user's --set (e.g. sample.sampler=ddpm) still wins.
        out = [*OBJECTIVE_OVERRIDES[self.objective], *self.overrides]
        if self.steps is not None:
            out.append(f"train.steps={self.steps}")
        if self.num_samples is not None:
            out.append(f"sample.num_samples={self.num_samples}")
        if self.sample_steps is not None:
            out.append(f"sample.num_steps={self.sample_steps}")
        return out


# ----------------------------------------------------------------------------------------------------
# planning


def variants(spec: RoutingSpec, preset_pool: int, preset_experts: int = 0) -> list[Variant]:
    bad = [m for m in spec.modes if m not in ROUTING_MODES]
    if bad or not spec.modes:
        raise ValueError(f"--modes: {bad or 'none given'}; choose from {', '.join(ROUTING_MODES)}")
    out = [Variant(m, preset_pool) for m in ROUTING_MODES if m in spec.modes]
    out += [Variant("diffmoe", p, sweep=True) for p in spec.pool_sweep if p != preset_pool]
    out += [
        Variant("diffmoe", preset_pool, num_experts=e)
        for e in spec.expert_sweep
        if e != preset_experts
    ]
    return out


def run_overrides(spec: RoutingSpec, v: Variant, seed: int, run_dir: Path) -> list[str]:
    # A dense FFN has no experts to shard: with nproc > 1 it trains data-parallel (ep = 1).
    ep = 1 if v.mode == "dense" else spec.ep
    experts = [f"moe.num_experts={v.num_experts}"] if v.num_experts else []
    return [
        *spec.base_overrides(),
        f"moe.mode={v.mode}",
        f"moe.pool_samples={v.pool_samples}",
        *experts,
        f"train.seed={seed}",
        f"parallel.ep={ep}",
        f"run.dir={run_dir}",
        "run.progress=false",
    ]


def sample_overrides(v: Variant, cfg: Config) -> list[str]:
    """Evaluation runs on one process; DiffMoE samples one pool per forward (see module doc)."""
    bs = v.pool_samples if v.mode == "diffmoe" else cfg.sample.batch_size
    return ["parallel.ep=1", f"sample.batch_size={bs}"]


def resolve(spec: RoutingSpec, v: Variant, seed: int, run_dir: Path) -> Config:
    """The variant's resolved config; layout problems raise ValueError before anything trains."""
    cfg = load_config(spec.config, run_overrides(spec, v, seed, run_dir))
    validate_layout(cfg, spec.nproc)
    if v.mode == "diffmoe" and spec.heldout_samples % v.pool_samples:
        raise ValueError(
            f"--heldout-samples={spec.heldout_samples} is not a multiple of pool_samples="
            f"{v.pool_samples}: the held-out loss runs whole pools"
        )
    return cfg


# ----------------------------------------------------------------------------------------------------
# runner: one run = train (subprocess), evaluate (subprocess)


def run_one(spec: RoutingSpec, v: Variant, seed: int) -> dict[str, Any]:
    """Train and evaluate one (variant, seed); reuse a finished result with the same settings."""
    run_dir = spec.work_dir / v.key / f"seed{seed}"
    cfg = resolve(spec, v, seed, run_dir)
    fingerprint = {
        "config": cfg.to_dict(),
        "nproc": spec.nproc,
        "rules": list(v.rules),
        "sample": sample_overrides(v, cfg),
        "heldout_samples": spec.heldout_samples,
    }
    result_path = run_dir / "result.json"
    if result_path.is_file():
        old = json.loads(result_path.read_text())
        if old.get("fingerprint") == fingerprint:
            spec.log(f"[reuse] {v.label} seed {seed}: {result_path}")
            return old
    if run_dir.exists():
        # Not reusable (unfinished, or other settings): start clean, so every number in the
        # table comes from one uninterrupted run of the committed command.
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    spec.log(f"[train] {v.label} seed {seed} ({cfg.train.steps} steps, nproc {spec.nproc})")
    train_cmd = train_command(spec.config, run_overrides(spec, v, seed, run_dir), spec.nproc)
    train_s = run_logged(train_cmd, run_dir / "train.log").check().wall_s
    spec.log(f"[eval]  {v.label} seed {seed} (trained in {train_s:.0f} s)")
    eval_cmd = [sys.executable, "-m", "diffmoe_dist.studies.routing_eval", str(run_dir)]
    eval_cmd += ["--rules", ",".join(v.rules), "--heldout-samples", str(spec.heldout_samples)]
    eval_cmd += ["--out", str(run_dir / "eval.json")]
    for item in sample_overrides(v, cfg):
        eval_cmd += ["--set", item]
    eval_s = run_logged(eval_cmd, run_dir / "eval.log").check().wall_s
    evals = json.loads((run_dir / "eval.json").read_text())
    result = {
        "variant": v.key,
        "mode": v.mode,
        "pool_samples": v.pool_samples,
        "seed": seed,
        "train_s": train_s,
        "eval_s": eval_s,
        "final_train": json.loads((run_dir / "final.json").read_text()),
        "rules": evals,
        "fingerprint": fingerprint,
    }
    write_json(result_path, result)
    return result


@dataclass
class StudyResult:
    rows: list[Row]
    base: Config  # the preset with the study's overrides (what the report describes)
    wall_s: float
    versions: dict[str, str]


def run_study(spec: RoutingSpec) -> StudyResult:
    """Plan (fail fast on layout errors), then train + evaluate every (variant, seed)."""
    base = load_config(spec.config, spec.base_overrides())
    vs = variants(spec, base.moe.pool_samples, base.moe.num_experts)
    params = {}
    for v in vs:  # every layout checked before the first run starts
        cfg = resolve(spec, v, 0, spec.work_dir / v.key / "seed0")
        params[v.key] = count_config_params(cfg)
    acts = {params[v.key]["activated"] for v in vs}
    if len(acts) != 1:
        raise AssertionError(f"variants differ in activated params: {params}")
    vers = versions()  # at the start: others may commit while the study runs
    t0 = time.perf_counter()
    todo = [(v, s) for s in range(spec.seeds) for v in vs]
    with ThreadPoolExecutor(max_workers=spec.jobs) as pool:
        results = list(pool.map(lambda vs_: run_one(spec, *vs_), todo))
    wall = time.perf_counter() - t0
    rows = build_rows(results, vs, params)
    summary = {"rows": [r.__dict__ for r in rows], "wall_s": wall, "command": spec.command}
    write_json(spec.work_dir / f"results{'_' + spec.tag if spec.tag else ''}.json", summary)
    return StudyResult(rows, base, wall, vers)


# ----------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESET_FILES), default="cpu")
    p.add_argument("--config", type=Path, help="use this YAML instead of the preset's")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    p.add_argument("--steps", type=int, help="train.steps (default: the preset's)")
    p.add_argument(
        "--modes", default=",".join(ROUTING_MODES), help=f"subset of {','.join(ROUTING_MODES)}"
    )
    p.add_argument(
        "--pool-samples",
        default="",
        help="extra DiffMoE pool sizes, e.g. 16,128 (the sweep; the preset's pool is always the "
        "main DiffMoE row)",
    )
    p.add_argument(
        "--experts",
        default="",
        help="extra DiffMoE expert counts, e.g. 2,4,8,16 (the sweep; the preset's E is the main "
        "row; --ep must divide each)",
    )
    p.add_argument(
        "--objective",
        choices=tuple(OBJECTIVE_OVERRIDES),
        default="flow",
        help="training objective of every variant (ddpm: DiT's DDPM, sampled with DDIM)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="training processes per run (torchrun, gloo on CPU; Dense trains data-parallel, "
        "evaluation always runs on one process)",
    )
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree of the MoE runs")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs at a time (default: 2 with --nproc 1, else 1; the CPU box has 2 cores)",
    )
    p.add_argument("--num-samples", type=int, help="judge samples per run (default: preset's)")
    p.add_argument("--sample-steps", type=int, help="sampler steps (default: preset's)")
    p.add_argument("--heldout-samples", type=int, default=512)
    p.add_argument("--out", type=Path, help="reproduction.md/.png go here (default: docs/)")
    p.add_argument(
        "--work-dir",
        type=Path,
        help="run directories (default: runs/reproduce_<preset>[_<objective>]); finished runs "
        "there are reused by a rerun with identical settings",
    )
    p.add_argument(
        "--tag",
        default="",
        help="name of this study's section in reproduction.md (plot: reproduction_TAG.png), so "
        "e.g. a pool sweep sits beside the main table",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def spec_from_args(args: argparse.Namespace, root: Path, command: str) -> RoutingSpec:
    """The spec of a command line; defaults (preset, docs/, runs/) are resolved under ``root``."""
    config = args.config or root / "configs" / PRESET_FILES[args.preset]
    if not args.config and not config.is_file():
        raise ValueError(
            f"--preset {args.preset}: {config} not found; pass --config, or run from the "
            "repository root (tools/reproduce_routing.py finds its checkout's configs/)"
        )
    # A DDPM study gets its own runs and doc section by default (a rerun must not replace the flow ones).
    suffix = "" if args.objective == "flow" else f"_{args.objective}"
    return RoutingSpec(
        config=config,
        work_dir=args.work_dir or root / "runs" / f"reproduce_{args.preset}{suffix}",
        out_dir=args.out or root / "docs",
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
        tag=args.tag or suffix.lstrip("_"),
        objective=args.objective,
        command=command,
    )


def main(
    argv: list[str] | None = None,
    root: Path | None = None,
    prog: str = "python -m diffmoe_dist.studies.reproduce_routing",
) -> int:
    """``root``: where the default preset (configs/), docs/ and runs/ are (default: the current
    directory); ``prog``: how the report's command line starts."""
    args = parse_args(argv, prog.split()[-1])
    argv_used = sys.argv[1:] if argv is None else argv
    try:
        spec = spec_from_args(args, root or Path.cwd(), shlex.join([*prog.split(), *argv_used]))
        res = run_study(spec)
        doc, png = write_report(spec, res.rows, res.wall_s, res.base, res.versions)
    except ValueError as e:
        print(f"reproduce_routing: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a training or evaluation subprocess failed: its log tail is in e
        print(f"reproduce_routing: {e}", file=sys.stderr)
        return 1
    for r in res.rows:
        fd, acc, loss = r.stat("fd"), r.stat("accuracy"), r.stat("heldout_loss")
        print(
            f"{r.label:<40} fd {fd[0]:.3f}±{fd[1]:.3f}  acc {acc[0]:.3f}±{acc[1]:.3f}  "
            f"loss {loss[0]:.4f}±{loss[1]:.4f}  C_infer {r.stat('c_infer')[0]:.3f}"
        )
    print(f"wrote {doc} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
