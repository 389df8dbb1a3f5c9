"""The scaling study's report: per-run numbers from each run's metrics.jsonl, scaling efficiency and
loss agreement against the baseline layout, results.csv / results.md / results.json, and the plots
(scaling.png, loss_curves.png). Reads only what the runs wrote.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffmoe_dist.studies.common import (
    markdown_table,
    versions_line,
    write_json,
    write_text_atomic,
)

if TYPE_CHECKING:
    from diffmoe_dist.studies.scaling_study import PlannedRun


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records; unlike trainer/metrics.read_metrics this skips a line that
    does not parse, since a study also reads runs that were killed mid-write (failed, timed out)."""
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
    pt = plan.point
    row: dict[str, Any] = {
        "layout": pt.name,
        "nodes": pt.nodes,
        "nproc": pt.nproc,
        "world": pt.world,
        "ep": pt.ep,
        "micro": pt.micro,
        "global_batch": pt.global_batch,
        "pool_samples": plan.cfg.moe.pool_samples,
        "pool_span": plan.layout.pool_span,
    }
    if not recs:
        return row
    timed = recs[warmup:] if len(recs) > warmup else recs
    sps = _mean([r.get("samples_per_s") for r in timed])
    row["samples_per_s"] = sps
    row["samples_per_s_per_rank"] = sps / pt.world if sps else None
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


def write_table(
    rows: list[dict[str, Any]], out: Path, vers: dict[str, str] | None = None
) -> tuple[Path, Path]:
    """results.csv and results.md (one row per layout, failed ones included; ``vers``, the code
    and library versions the runs used, below the table) + results.json."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "results.md"
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    tmp.replace(csv_path)
    table = markdown_table(COLUMNS, ([_fmt(r.get(k)) for k in COLUMNS] for r in rows))
    base = next((r.get("baseline") for r in rows if r.get("baseline")), None)
    notes = (
        f"scaling_eff: samples/s per rank relative to {base or 'the smallest successful layout'} "
        "(1.0 = linear). a2a_share: time in the expert dispatcher's collectives / step time, "
        "mean over ranks. peak_mem_mb: max over ranks (GPU: max_memory_allocated, CPU: peak RSS). "
        "tflops_per_rank / mfu: model FLOPs (diffmoe_dist/models/flops.py). load_skew: max/mean "
        "tokens per expert (max over layers). max_loss_diff: largest |loss - baseline loss| over "
        "steps (the model is held fixed, so this is float rounding)."
    )
    tail = f"\n{versions_line(vers)}\n" if vers else ""
    write_text_atomic(md_path, f"{table}\n{notes}\n{tail}")
    write_json(out / "results.json", rows)
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


def write_report(rows: list[dict[str, Any]], out: Path, vers: dict[str, str] | None = None) -> Path:
    """Everything the study writes from its rows (baseline columns added in place); returns the .md."""
    finish_table(rows)
    _, md_path = write_table(rows, out, vers)
    plot_study(rows, out)
    return md_path
