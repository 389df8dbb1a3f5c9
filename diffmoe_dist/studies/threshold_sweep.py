"""The paper's Table 10 for our model: C_infer and sample quality for the learned (dynamic) thresholds,
a list of fixed global thresholds gamma, and static top-k (C = 1), from one checkpoint.

Quality: the digits judge (accuracy, Frechet distance) for digits runs; FID / IS / precision-recall
for latent runs when --ref and --inception are given (--vae decodes), else C_infer only.
Writes <out>/sweep.md (Markdown table), sweep.json and sweep.png (quality vs C_infer).

    python tools/threshold_sweep.py --run-dir runs/digits --gammas 0.1,0.2,0.3,0.4,0.5,0.6,0.7
    torchrun --nproc-per-node 8 tools/threshold_sweep.py --run-dir runs/in256 --vae VAE \
        --ref REF.npz --inception WEIGHTS.pth --set sample.num_samples=10000

Every setting samples the same labels from the same noise (sample.seed), so rows differ only in the
inference rule.

Shape (as every study): ``SweepSpec`` (what to run, checked before any sampling), ``run_sweep`` (the
runner: every rank samples every setting through the inference API, in this process, so the sweep
runs under torchrun like ``diffmoe-sample``), ``write_report`` (sweep.json, sweep.md, sweep.png).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmoe_dist.inference import (
    class_labels,
    load_sampling_config,
    output_dir,
    resolve_checkpoint,
    resolve_with_config,
    sample_from_checkpoint,
)
from diffmoe_dist.parallel.distributed import cleanup, init_distributed
from diffmoe_dist.studies.common import (
    markdown_table,
    versions,
    versions_line,
    write_json,
    write_text_atomic,
)

DEFAULT_GAMMAS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"


# ----------------------------------------------------------------------------------------------------
# spec


def parse_gammas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise ValueError(f"--gammas must be comma-separated numbers, got {text!r}") from e


@dataclass(frozen=True)
class SweepSpec:
    """One threshold sweep; the command line maps onto it."""

    run_dir: str | None = None  # the run's latest checkpoint ...
    checkpoint: str | None = None  # ... or this one
    gammas: tuple[float, ...] = parse_gammas(DEFAULT_GAMMAS)
    static_capacity: float = 1.0
    out: str | None = None  # None: <run>/sweep (a --checkpoint outside a run must name one)
    vae: str | None = None  # local AutoencoderKL directory (latents runs)
    ref: str | None = None  # FID reference .npz (latents runs)
    inception: str | None = None  # local Inception weights (with ref)
    overrides: tuple[str, ...] = ()  # --set for every setting

    def __post_init__(self) -> None:
        bad = [g for g in self.gammas if not 0.0 < g < 1.0]
        if bad:
            raise ValueError(f"--gammas: thresholds are probabilities in (0, 1), got {bad}")
        if not self.static_capacity > 0:
            raise ValueError(f"--static-capacity must be > 0, got {self.static_capacity}")

    def settings(self) -> list[tuple[str, list[str]]]:
        """(row name, --set overrides) in table order: dynamic, each gamma, static."""
        rows = [("dynamic (learned)", ["moe.infer_mode=dynamic"])]
        rows += [(f"gamma={g:g}", ["moe.infer_mode=gamma", f"moe.gamma={g}"]) for g in self.gammas]
        c = self.static_capacity
        rows.append((f"static (C={c:g})", ["moe.infer_mode=static", f"moe.infer_capacity={c}"]))
        return rows


# ----------------------------------------------------------------------------------------------------
# runner


def run_sweep(spec: SweepSpec) -> list[dict[str, Any]] | None:
    """Every rank runs every setting; rank 0 returns the rows (others None). Bad input raises
    ValueError before any process group exists."""
    ckpt, base = resolve_with_config(spec.run_dir, spec.checkpoint, list(spec.overrides))
    if base.moe.mode != "diffmoe" or not base.moe.predictor:
        raise ValueError(
            f"{ckpt}: a threshold sweep needs moe.mode=diffmoe with moe.predictor=true, "
            f"got mode={base.moe.mode} predictor={base.moe.predictor}"
        )
    digits = base.data.name == "digits"
    if spec.ref and digits:
        raise ValueError(
            "--ref (FID) needs RGB samples; digits runs are scored by the digits judge"
        )
    if bool(spec.ref) != bool(spec.inception):
        raise ValueError("FID needs both --ref and --inception")
    if spec.ref:
        from diffmoe_dist.quality.fid import check_paths

        check_paths(spec.ref, spec.inception)
    labels = class_labels(base, None)
    info = init_distributed(base.parallel.backend, base.parallel.timeout_s)
    judge: Any = None
    rows: list[dict[str, Any]] = []
    first = True
    for name, extra in spec.settings():
        cfg = load_sampling_config(ckpt, [*spec.overrides, *extra])
        # One checkpoint for every row: a live run's pruned checkpoint is replaced only before the
        # first row (follow_latest), later rows use the one the first row loaded.
        images, report = sample_from_checkpoint(
            cfg, ckpt, labels, info, spec.vae, follow_latest=not spec.checkpoint and first
        )
        ckpt, first = Path(report["checkpoint"]), False
        if images is None:
            continue
        row: dict[str, Any] = {
            "setting": name,
            "checkpoint": str(ckpt),
            "infer_mode": cfg.moe.infer_mode,
            "gamma": cfg.moe.gamma if cfg.moe.infer_mode == "gamma" else None,
            "c_infer": report["c_infer"],
            "c_infer_per_layer": report["c_infer_per_layer"],
        }
        if digits:
            from diffmoe_dist.quality.digits import DigitsJudge

            judge = judge or DigitsJudge.load_or_fit()
            row.update(judge.evaluate(images, labels.numpy()))
        elif spec.ref:
            from diffmoe_dist.quality.fid import FIDScorer

            judge = judge or FIDScorer(spec.ref, spec.inception, info.device)
            row.update(judge.score(images, cfg.sample.num_samples))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "c_infer_per_layer"}), flush=True)
    return rows if info.rank == 0 else None


# ----------------------------------------------------------------------------------------------------
# report


QUALITY = [  # (key, column title, lower is better)
    ("fid", "FID", True),
    ("fd", "digits FD", True),
    ("accuracy", "digits acc.", False),
    ("inception_score", "IS", False),
    ("precision", "precision", False),
    ("recall", "recall", False),
]


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    cols = [(k, t) for k, t, _ in QUALITY if any(r.get(k) is not None for r in rows)]
    cells = [
        [r["setting"], f"{r['c_infer']:.3f}"]
        + [f"{r[k]:.4g}" if r.get(k) is not None else "-" for k, _ in cols]
        for r in rows
    ]
    return f"### {title}\n\n" + markdown_table(
        ["threshold", "C_infer", *(t for _, t in cols)], cells
    )


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, t, low) for k, t, low in QUALITY[:3] if any(r.get(k) is not None for r in rows)]
    if not keys:
        keys = [("c_infer", "C_infer", True)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, (k, t, low) in zip(axes[0], keys):
        for r in rows:
            style = {"gamma": "o", "dynamic": "*"}.get(r["infer_mode"], "s")
            ax.plot(r["c_infer"], r[k], style, ms=9 if style == "*" else 6)
            ax.annotate(r["setting"], (r["c_infer"], r[k]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        g = sorted((r["c_infer"], r[k]) for r in rows if r["infer_mode"] == "gamma")
        if g:
            ax.plot(*zip(*g), "-", color="gray", lw=0.8, zorder=0)
        ax.set_xlabel("C_infer (token-expert pairs per token; static top-k = C)")
        ax.set_ylabel(f"{t} ({'lower' if low else 'higher'} is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    rows: list[dict[str, Any]], out: Path, title: str, vers: dict[str, str] | None = None
) -> Path:
    """sweep.json, sweep.md (``vers`` below the table) and sweep.png under ``out``; returns the .md."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", rows)
    tail = f"\n{versions_line(vers)}\n" if vers else ""
    write_text_atomic(out / "sweep.md", markdown(rows, title) + tail)
    plot(rows, out / "sweep.png", title)
    return out / "sweep.md"


# ----------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None) -> SweepSpec:
    p = argparse.ArgumentParser(
        prog="threshold_sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir")
    p.add_argument("--checkpoint")
    p.add_argument("--gammas", default=DEFAULT_GAMMAS)
    p.add_argument("--static-capacity", type=float, default=1.0)
    p.add_argument(
        "--out",
        help="output directory (default: <run-dir or checkpoint's run>/sweep; required for a "
        "--checkpoint outside a run directory)",
    )
    p.add_argument("--vae", help="local AutoencoderKL directory (latents runs)")
    p.add_argument("--ref", help="reference .npz for FID (latents runs)")
    p.add_argument("--inception", help="local Inception weights .pth (with --ref)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    return SweepSpec(
        run_dir=args.run_dir,
        checkpoint=args.checkpoint,
        gammas=parse_gammas(args.gammas),
        static_capacity=args.static_capacity,
        out=args.out,
        vae=args.vae,
        ref=args.ref,
        inception=args.inception,
        overrides=tuple(args.set),
    )


def main(argv: list[str] | None = None) -> int:
    md: Path | None = None
    try:
        spec = parse_args(argv)
        if spec.checkpoint and not spec.out:  # refused before the sweep's work, not after it
            output_dir(Path(spec.checkpoint), None, "sweep")
        rows = run_sweep(spec)
        if rows is not None:
            ckpt = (
                Path(rows[0]["checkpoint"])
                if rows
                else resolve_checkpoint(spec.run_dir, spec.checkpoint)
            )
            out = output_dir(ckpt, spec.out, "sweep")
            md = write_report(rows, out, f"threshold sweep: {ckpt}", versions())
    except ValueError as e:
        print(f"threshold_sweep: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if md is not None:
        print(md.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
