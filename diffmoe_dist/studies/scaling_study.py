"""The scaling-study library behind ``tools/scaling_study.py``: layouts, the fixed-model check,
launch commands, per-run summaries, the results table and its plots.

A layout is ``nodes=N,nproc=P,ep=E,micro=M`` (world = N*P ranks, micro-batch M per rank, global
batch = world*M). Optional keys: ``pool=S`` (must equal the base config's moe.pool_samples: the pool
is part of the model) and dotted config overrides that do not touch the model (``parallel.*``,
``deepspeed.*``, ``train.precision``), e.g. ``parallel.dedup_tokens=true``.

The model is held fixed across a sweep (DESIGN.md section 2): every layout must realise the same
moe.pool_samples and the same global batch (unless weak scaling is asked for), checked with
``config.validate_layout`` before anything runs; a sweep that breaks it is refused with a
ValueError naming the layout.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmoe_dist.config import Config, load_config, validate_layout

LAYOUT_KEYS = ("nodes", "nproc", "ep", "micro")
# Per-layout overrides allowed: they change how the model is run, never what it computes.
LAYOUT_OVERRIDE_PREFIXES = ("parallel.", "deepspeed.", "train.precision")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Layout:
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


def parse_layouts(spec: str) -> list[Layout]:
    """``"nodes=1,nproc=1,ep=1,micro=16; nodes=1,nproc=2,ep=2,micro=8"`` -> layouts."""
    out: list[Layout] = []
    for i, chunk in enumerate([c for c in spec.split(";") if c.strip()], start=1):
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
        out.append(Layout(i, **vals, overrides=tuple(extra)))  # type: ignore[arg-type]
    if not out:
        raise ValueError("--layouts is empty")
    return out


@dataclass
class PlannedRun:
    layout: Layout
    cfg: Config
    overrides: list[str]  # --set items for the trainer (run.dir excluded)
    run_dir: Path
    info: dict[str, int] = field(default_factory=dict)


def plan_sweep(
    config: str | os.PathLike[str],
    layouts: list[Layout],
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
            info = validate_layout(cfg, lay.world)
        except ValueError as e:
            raise ValueError(f"{where} cannot realise the model: {e}") from None
        if cfg.moe.pool_samples != P:
            raise ValueError(f"{where} changes moe.pool_samples {P} -> {cfg.moe.pool_samples}")
        plans.append(PlannedRun(lay, cfg, ov, out / "runs" / lay.name, info))
    names = [p.layout.name for p in plans]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"layouts repeat: {sorted(dup)}")
    return plans


# ----------------------------------------------------------------------------------------------------
# commands


def _set_args(overrides: list[str]) -> list[str]:
    return [a for item in overrides for a in ("--set", item)]


def local_command(plan: PlannedRun, config: str | os.PathLike[str]) -> list[str]:
    """One node: ``python -m diffmoe_dist.train`` (1 rank) or torchrun --standalone (several)."""
    lay = plan.layout
    cmd = [sys.executable]
    if lay.world > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
        cmd += [f"--nproc-per-node={lay.nproc}"]
    cmd += ["-m", "diffmoe_dist.train", "--config", str(config)]
    return cmd + _set_args([f"run.dir={plan.run_dir}", *plan.overrides])


def slurm_command(
    plan: PlannedRun, config: str | os.PathLike[str], sbatch_args: list[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """``sbatch --wait`` of launchers/slurm_train.sh with its knobs (CONFIG, RUN_DIR, NPROC_PER_NODE)
    in the environment; returns (command, environment additions). The script adds run.dir itself."""
    lay = plan.layout
    cmd = [
        "sbatch",
        "--wait",  # block until the job ends; exit code = the job's
        f"--nodes={lay.nodes}",
        f"--job-name=scale-{lay.name}",
        f"--output={plan.run_dir}.slurm-%j.out",
        *(sbatch_args or []),
        str(REPO / "launchers" / "slurm_train.sh"),
        *_set_args(plan.overrides),
    ]
    env = {
        "CONFIG": str(Path(config).resolve()),
        "RUN_DIR": str(plan.run_dir),
        "NPROC_PER_NODE": str(lay.nproc),
        "REPO_DIR": str(REPO),
    }
    return cmd, env


def run_one(
    cmd: list[str], env_extra: dict[str, str], log_path: Path, timeout_s: float
) -> tuple[int, float, str]:
    """Run to completion; (returncode, wall seconds, last error line). Timeout -> rc 124."""
    env = {**os.environ, **env_extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a driver run under torchrun must not pass its identity on
    t0 = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the session this call started
            except ProcessLookupError:
                pass
            proc.wait()
            rc = 124
    wall = time.perf_counter() - t0
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    # The first "<prog>: error: ..." line is the trainer's own message; else the last error-ish line.
    err = next((ln for ln in lines if ": error:" in ln), "") or next(
        (ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else ""
    )
    if rc == 124:
        err = f"timed out after {timeout_s:.0f}s"
    return rc, wall, err.strip()[:300]


# ----------------------------------------------------------------------------------------------------
# results


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _mean(v: list[float]) -> float | None:
    v = [x for x in v if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def summarize_run(plan: PlannedRun, warmup: int = 1) -> dict[str, Any]:
    """Numbers of one finished run from its metrics.jsonl (the first ``warmup`` steps skipped for
    throughput and timing, when more remain)."""
    recs = read_metrics(plan.run_dir)
    lay = plan.layout
    row: dict[str, Any] = {
        "layout": lay.name,
        "nodes": lay.nodes,
        "nproc": lay.nproc,
        "world": lay.world,
        "ep": lay.ep,
        "micro": lay.micro,
        "global_batch": lay.global_batch,
        "pool_samples": plan.cfg.moe.pool_samples,
        "pool_span": plan.info.get("pool_span", 1),
    }
    if not recs:
        return row
    timed = recs[warmup:] if len(recs) > warmup else recs
    sps = _mean([r.get("samples_per_s") for r in timed])
    row["samples_per_s"] = sps
    row["samples_per_s_per_rank"] = sps / lay.world if sps else None
    row["tflops_per_rank"] = _mean([r.get("tflops_per_rank") for r in timed])
    row["mfu"] = _mean([r.get("mfu") for r in timed])
    step = _mean([r.get("step_time_s") for r in timed])
    row["step_time_ms"] = step * 1e3 if step is not None else None
    row["a2a_share"] = _mean([r.get("a2a_share") for r in timed])
    mem = [r["peak_mem_mb"] for r in recs if r.get("peak_mem_mb") is not None]
    row["peak_mem_mb"] = max(mem) if mem else None
    row["load_skew"] = _mean([r.get("expert_load_skew") for r in recs])
    row["final_loss"] = recs[-1].get("loss")
    row["losses"] = {int(r["step"]): r["loss"] for r in recs if "loss" in r}
    return row


def finish_table(rows: list[dict[str, Any]]) -> None:
    """Scaling efficiency and loss agreement against the smallest successful layout (in place).

    efficiency = (samples/s per rank) / (samples/s per rank of the baseline): 1.0 is linear
    scaling under a fixed global batch (strong scaling).
    """
    ok = [r for r in rows if r.get("status") == "ok" and r.get("samples_per_s_per_rank")]
    if not ok:
        return
    base = min(ok, key=lambda r: (r["world"], rows.index(r)))
    for r in rows:
        if r in ok:
            r["scaling_eff"] = r["samples_per_s_per_rank"] / base["samples_per_s_per_rank"]
        if r.get("losses") and base.get("losses"):
            common = set(r["losses"]) & set(base["losses"])
            if common:
                r["max_loss_diff"] = max(abs(r["losses"][s] - base["losses"][s]) for s in common)
    for r in rows:
        r["baseline"] = base["layout"]


COLUMNS = (
    "layout",
    "status",
    "nodes",
    "nproc",
    "world",
    "ep",
    "micro",
    "global_batch",
    "pool_samples",
    "pool_span",
    "samples_per_s",
    "samples_per_s_per_rank",
    "scaling_eff",
    "tflops_per_rank",
    "mfu",
    "step_time_ms",
    "a2a_share",
    "peak_mem_mb",
    "load_skew",
    "final_loss",
    "max_loss_diff",
    "wall_s",
    "returncode",
    "error",
)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """results.csv and results.md (one row per layout, failed ones included) + results.json."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "results.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [_fmt(r.get(k)).replace("|", "/") for k in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    base = next((r.get("baseline") for r in rows if r.get("baseline")), None)
    notes = [
        "",
        f"scaling_eff: samples/s per rank relative to {base or 'the smallest successful layout'} "
        "(1.0 = linear). a2a_share: time in the expert dispatcher's collectives / step time, "
        "mean over ranks. peak_mem_mb: max over ranks (GPU: max_memory_allocated, CPU: peak RSS). "
        "tflops_per_rank / mfu: model FLOPs (diffmoe_dist/models/flops.py). load_skew: max/mean tokens per "
        "expert (max over layers). max_loss_diff: largest |loss - baseline loss| over steps "
        "(the model is held fixed, so this is float rounding).",
    ]
    md_path.write_text("\n".join(lines + notes) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    return csv_path, md_path


def plot_study(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """scaling.png (five panels, one bar per layout) and loss_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    names = [r["layout"] for r in rows]
    panels = (
        ("samples_per_s_per_rank", "samples/s per rank"),
        ("scaling_eff", "scaling efficiency"),
        ("a2a_share", "all-to-all share of step time"),
        ("peak_mem_mb", "peak memory per rank (MiB)"),
        ("load_skew", "expert-load skew (max/mean)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        vals = [r.get(key) if r.get(key) is not None else 0.0 for r in rows]
        colors = ["tab:blue" if r.get("status") == "ok" else "tab:red" for r in rows]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=7)
        for i, r in enumerate(rows):
            if r.get("status") != "ok":
                ax.text(i, 0, "failed", rotation=90, color="tab:red", ha="center", va="bottom")
        ax.set_title(title, fontsize=9)
        if key == "scaling_eff":
            ax.axhline(1.0, color="gray", linestyle=":")
    fig.suptitle("scaling study (red: failed)", fontsize=10)
    fig.tight_layout()
    paths = [out / "scaling.png"]
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        if r.get("losses"):
            steps = sorted(r["losses"])
            ax.plot(steps, [r["losses"][s] for s in steps], marker=".", label=r["layout"])
    ax.set(xlabel="step", ylabel="loss", title="loss per layout (should overlap)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)
    return paths


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
