"""Plots of a run's expert telemetry (metrics.jsonl, and samples/sample_report.json when present).

    python tools/plot_telemetry.py runs/tiny [--out runs/tiny/plots]

Writes PNGs (matplotlib, Agg backend):
  tokens_per_expert_layer{i}.png  heatmap: logged step x expert, tokens per expert of MoE layer i
  capacity.png                    realised capacity per layer over steps
  compute_vs_t.png                mean experts per token by timestep bucket (t = 0 noise, 1 data),
                                  per layer, training (token-weighted over all logged steps) and,
                                  dashed, sampling
  compute_vs_class.png            the same by class label (last = the null label of CFG)
  predictor_pr.png                capacity predictor precision / recall per layer over steps
Plots whose data the run does not have (e.g. no predictor) are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    """matplotlib on the Agg backend, imported on first use (importing this module stays cheap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, in order; a last line cut by a kill is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist (is '{run_dir}' a training run directory?)")
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return recs


def _arr(rows: list[Any]) -> np.ndarray:
    """Nested lists with None -> float array with NaN."""
    return np.array(
        [[np.nan if v is None else v for v in r] if isinstance(r, list) else r for r in rows],
        dtype=float,
    )


def weighted_compute(recs: list[dict[str, Any]], key: str, tokens_key: str) -> np.ndarray | None:
    """Token-weighted mean over records of per-layer experts-per-token arrays -> [layers, bins]."""
    num = den = None
    for r in recs:
        if key not in r or tokens_key not in r:
            continue
        ratio = np.nan_to_num(_arr(r[key]))  # [L, bins]
        tok = np.asarray(r[tokens_key], dtype=float)  # [bins]
        num = ratio * tok if num is None else num + ratio * tok
        den = tok if den is None else den + tok
    if num is None:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _save(fig: Any, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    written.append(path)


def plot_run(run_dir: Path, out: Path) -> list[Path]:
    """Write every plot the run has data for into ``out``; return the paths written."""
    plt = _pyplot()
    recs = read_records(run_dir)
    if not recs:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records")
    report_path = run_dir / "samples" / "sample_report.json"
    sample = json.loads(report_path.read_text()).get("telemetry") if report_path.is_file() else None
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    tpe = [r for r in recs if "tokens_per_expert" in r]
    if tpe:
        counts = np.array([r["tokens_per_expert"] for r in tpe], dtype=float)  # [steps, L, E]
        for i in range(counts.shape[1]):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            im = ax.imshow(counts[:, i, :].T, aspect="auto", origin="lower", cmap="viridis")
            ax.set(xlabel="logged step", ylabel="expert", title=f"tokens per expert, MoE layer {i}")
            ticks = np.linspace(0, len(tpe) - 1, min(len(tpe), 8)).round().astype(int)
            ax.set_xticks(ticks, [str(tpe[k]["step"]) for k in ticks])
            fig.colorbar(im, ax=ax, label="tokens")
            _save(fig, out / f"tokens_per_expert_layer{i}.png", written)

    cap = [r for r in recs if "capacity_per_layer" in r]
    if cap:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        c = _arr([r["capacity_per_layer"] for r in cap])
        for i in range(c.shape[1]):
            ax.plot([r["step"] for r in cap], c[:, i], marker=".", label=f"layer {i}")
        ax.set(xlabel="step", ylabel="pairs / token", title="realised capacity")
        ax.legend(fontsize=7)
        _save(fig, out / "capacity.png", written)

    for key, tokens_key, name, xlabel in (
        (
            "compute_by_t_bucket",
            "t_bucket_tokens",
            "compute_vs_t.png",
            "t bucket (0 noise, 1 data)",
        ),
        ("compute_by_class", "class_tokens", "compute_vs_class.png", "class (last = null)"),
    ):
        train = weighted_compute(recs, key, tokens_key)
        if train is None:
            print(f"plot_telemetry: no {key} in metrics.jsonl, skipped {name}", file=sys.stderr)
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = train.shape[1]
        x = (np.arange(bins) + 0.5) / bins if key == "compute_by_t_bucket" else np.arange(bins)
        for i in range(train.shape[0]):
            ax.plot(x, train[i], marker="o", label=f"train, layer {i}")
        if sample and key in sample:
            s = _arr(sample[key])
            for i in range(s.shape[0]):
                ax.plot(x, s[i], marker="x", linestyle="--", label=f"sampling, layer {i}")
        ax.set(xlabel=xlabel, ylabel="experts per token", title=key.replace("_", " "))
        ax.legend(fontsize=7)
        _save(fig, out / name, written)

    pr = [r for r in recs if r.get("pred_precision_per_layer") is not None]
    if pr and any(v is not None for r in pr for v in r["pred_precision_per_layer"]):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        p, rc = (
            _arr([r["pred_precision_per_layer"] for r in pr]),
            _arr([r["pred_recall_per_layer"] for r in pr]),
        )
        st = [r["step"] for r in pr]
        for i in range(p.shape[1]):
            ax.plot(st, p[:, i], marker=".", label=f"precision, layer {i}")
            ax.plot(st, rc[:, i], marker=".", linestyle="--", label=f"recall, layer {i}")
        ax.set(xlabel="step", ylabel="", ylim=(0, 1.05), title="capacity predictor vs routing")
        ax.legend(fontsize=7)
        _save(fig, out / "predictor_pr.png", written)
    else:
        print(
            "plot_telemetry: no predictor precision/recall, skipped predictor_pr.png",
            file=sys.stderr,
        )
    return written


def main(argv: list[str] | None = None) -> int:
    """``tools/plot_telemetry.py``: 0, or 2 with a message when the run has no metrics."""
    p = argparse.ArgumentParser(
        prog="plot_telemetry", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("run_dir", type=Path, help="training run directory (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/plots)")
    args = p.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out or args.run_dir / "plots")
    except ValueError as e:
        print(f"plot_telemetry: error: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0
