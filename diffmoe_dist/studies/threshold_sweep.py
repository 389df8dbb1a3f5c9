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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from diffmoe_dist.parallel.distributed import cleanup, init_distributed  # noqa: E402
from diffmoe_dist.sample import (  # noqa: E402
    class_labels,
    load_sampling_config,
    output_dir,
    resolve_checkpoint,
    resolve_with_config,
    sample_from_checkpoint,
)


def settings(gammas: list[float], static_capacity: float) -> list[tuple[str, list[str]]]:
    """(row name, --set overrides) in table order: dynamic, each gamma, static."""
    rows = [("dynamic (learned)", ["moe.infer_mode=dynamic"])]
    rows += [(f"gamma={g:g}", ["moe.infer_mode=gamma", f"moe.gamma={g}"]) for g in gammas]
    rows.append(
        (
            f"static (C={static_capacity:g})",
            ["moe.infer_mode=static", f"moe.infer_capacity={static_capacity}"],
        )
    )
    return rows


def parse_gammas(text: str) -> list[float]:
    try:
        gammas = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"--gammas must be comma-separated numbers, got {text!r}") from e
    bad = [g for g in gammas if not 0.0 < g < 1.0]
    if bad:
        raise ValueError(f"--gammas: thresholds are probabilities in (0, 1), got {bad}")
    return gammas


def sweep(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """Every rank runs every setting; rank 0 returns the rows (others None)."""
    gammas = parse_gammas(args.gammas)
    ckpt, base = resolve_with_config(args.run_dir, args.checkpoint, args.set)
    if base.moe.mode != "diffmoe" or not base.moe.predictor:
        raise ValueError(
            f"{ckpt}: a threshold sweep needs moe.mode=diffmoe with moe.predictor=true, "
            f"got mode={base.moe.mode} predictor={base.moe.predictor}"
        )
    digits = base.data.name == "digits"
    if args.ref and digits:
        raise ValueError(
            "--ref (FID) needs RGB samples; digits runs are scored by the digits judge"
        )
    if bool(args.ref) != bool(args.inception):
        raise ValueError("FID needs both --ref and --inception")
    if args.ref:
        from diffmoe_dist.quality.fid import check_paths

        check_paths(args.ref, args.inception)
    labels = class_labels(base, None)
    info = init_distributed(base.parallel.backend, base.parallel.timeout_s)
    judge: Any = None
    rows: list[dict[str, Any]] = []
    first = True
    for name, extra in settings(gammas, args.static_capacity):
        cfg = load_sampling_config(ckpt, [*args.set, *extra])
        # One checkpoint for every row: a live run's pruned checkpoint is replaced only before the
        # first row (follow_latest), later rows use the one the first row loaded.
        images, report = sample_from_checkpoint(
            cfg, ckpt, labels, info, args.vae, follow_latest=not args.checkpoint and first
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
        elif args.ref:
            from diffmoe_dist.quality.fid import FIDScorer

            judge = judge or FIDScorer(args.ref, args.inception, info.device)
            row.update(judge.score(images, cfg.sample.num_samples))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "c_infer_per_layer"}), flush=True)
    return rows if info.rank == 0 else None


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
    lines = [
        f"### {title}",
        "",
        "| threshold | C_infer |" + "".join(f" {t} |" for _, t in cols),
        "| --- | --- |" + " --- |" * len(cols),
    ]
    for r in rows:
        vals = [f"{r[k]:.4g}" if r.get(k) is not None else "-" for k, _ in cols]
        lines.append(f"| {r['setting']} | {r['c_infer']:.3f} |" + "".join(f" {v} |" for v in vals))
    return "\n".join(lines) + "\n"


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
            style = (
                "o"
                if r["infer_mode"] == "gamma"
                else ("*" if r["infer_mode"] == "dynamic" else "s")
            )
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="threshold_sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir")
    p.add_argument("--checkpoint")
    p.add_argument("--gammas", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
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
    try:
        if args.checkpoint and not args.out:  # refused before the sweep's work, not after it
            output_dir(Path(args.checkpoint), None, "sweep")
        rows = sweep(args)
        if rows is None:
            return 0
        ckpt = (
            Path(rows[0]["checkpoint"])
            if rows
            else resolve_checkpoint(args.run_dir, args.checkpoint)
        )
        out = output_dir(ckpt, args.out, "sweep")
        out.mkdir(parents=True, exist_ok=True)
        title = f"threshold sweep: {ckpt}"
        (out / "sweep.json").write_text(json.dumps(rows, indent=1))
        (out / "sweep.md").write_text(markdown(rows, title))
        plot(rows, out / "sweep.png", title)
    except ValueError as e:
        print(f"threshold_sweep: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    print((out / "sweep.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
