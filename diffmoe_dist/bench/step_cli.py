"""The command line of tools/bench_step.py: the whole training step of DiffMoE against Dense-DiT of
the same activated FLOPs (issue 15).

    python tools/bench_step.py                               # S, 8 and 32 images, 1 / 2 / 4 ranks
    python tools/bench_step.py --sizes S --images 8 --ranks 2 --json
    python tools/bench_step.py --device cuda --dtype bf16 --sizes L --images 32 --ranks 1
    python tools/bench_step.py --grad-reduce flat --variant bf16:train.grad_reduce_dtype=bf16
    python tools/bench_step.py --table a.json b.json         # saved --json results as one table

Every feature of the step has a flag that sets it for all cases (the "default" variant);
``--variant NAME:key=value,key=value`` adds a variant measured in the same processes, interleaved
with the default one, so a feature's effect is measured on/off in the same run. What is measured
and how (host syncs, exposed communication, MFU, memory): diffmoe_dist/bench/step_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from diffmoe_dist.bench.common import parse_ints
from diffmoe_dist.bench.step_bench import StepSpec, bench_ranks, validate_result

# flag -> config key of the feature (the values are checked by the config's own validation)
FEATURE_FLAGS = {
    "grad_reduce": "train.grad_reduce",  # overlap | flat
    "grad_reduce_dtype": "train.grad_reduce_dtype",  # fp32 | bf16
    "grad_bucket_mb": "train.grad_bucket_mb",
    "grad_accum": "train.grad_accum_steps",
    "grouped_mm": "moe.grouped_mm",  # true | false
    "fused_adamw": "train.fused_adamw",  # true | false
    "activation_checkpointing": "train.activation_checkpointing",  # none | blocks
    "prefetch": "data.prefetch",  # true | false
}


def _variants(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"default": []}
    for item in items:
        name, sep, body = item.partition(":")
        if not sep or not name or name in out:
            raise SystemExit(
                f"--variant {item!r}: expected NAME:key=value[,key=value] (unique NAME)"
            )
        out[name] = [kv for kv in body.split(",") if kv]
        if bad := [kv for kv in out[name] if "=" not in kv]:
            raise SystemExit(f"--variant {item!r}: {bad} are not key=value")
    return out


def main(argv: list[str] | None = None) -> int:
    """tools/bench_step.py: run (or print saved results), exit status 0."""
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, run the cases (or merge ``--table`` files), print; the result dict."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the JSON result only")
    ap.add_argument("--sizes", default="S", help="S,B,L,XL: DiffMoE-<size>-E<experts> vs Dense-DiT")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--images", default="8,32", help="images per rank (one pool per rank)")
    ap.add_argument("--ranks", default="1,2,4", help="process counts (ep = ranks for DiffMoE)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads per rank (0: cores/ranks)"
    )
    ap.add_argument("--grad-reduce", choices=("overlap", "flat"))
    ap.add_argument("--grad-reduce-dtype", choices=("fp32", "bf16"))
    ap.add_argument("--grad-bucket-mb", type=float)
    ap.add_argument(
        "--grad-accum", type=int, help="train.grad_accum_steps (micro-batches per step)"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config override for every case (e.g. model.depth=2 for a toy run)",
    )
    ap.add_argument("--grouped-mm", choices=("true", "false"), help="moe.grouped_mm")
    ap.add_argument("--fused-adamw", choices=("true", "false"), help="train.fused_adamw")
    ap.add_argument("--activation-checkpointing", choices=("none", "blocks"))
    ap.add_argument("--prefetch", choices=("true", "false"), help="data.prefetch")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print saved --json results")
    args = ap.parse_args(argv)
    if args.table:
        result = {"device": "", "cases": []}
        for path in args.table:
            with open(path) as f:
                r = json.load(f)
            validate_result(r)
            result["device"] = r["device"]
            result["cases"] += r["cases"]
        print_table(result)
        return result
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench_step: --device cuda but no CUDA device is visible")
    overrides = list(args.set)
    for flag, key in FEATURE_FLAGS.items():
        if (v := getattr(args, flag)) is not None:
            overrides.append(f"{key}={v}")
    variants = _variants(args.variant)
    sizes = [s for s in args.sizes.split(",") if s]
    models = []
    for s in sizes:
        if s not in ("S", "B", "L", "XL"):
            raise SystemExit(f"--sizes: unknown size {s!r}; expected S, B, L, XL")
        models += [f"Dense-DiT-{s}", f"DiffMoE-{s}-E{args.experts}"]
    cases = []
    for ranks in parse_ints(args.ranks, "ranks"):
        for images in parse_ints(args.images, "images"):
            spec = StepSpec(
                models=models,
                ranks=ranks,
                images_per_rank=images,
                variants=variants,
                overrides=overrides,
                device=args.device,
                dtype=args.dtype,
                warmup=args.warmup,
                repeats=args.repeats,
                threads=args.threads,
            )
            try:
                cases += bench_ranks(spec)
            except ValueError as e:
                raise SystemExit(f"bench_step: {e}") from None
            # partial results survive an interrupted sweep: one JSON line per finished rank count
            print(json.dumps({"partial": cases[-len(models) * len(variants) :]}), file=sys.stderr)
    result = {"device": _device_name(args.device), "cases": cases}
    validate_result(result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return result


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"cpu ({os.cpu_count()} cores, load {load:.1f})"


def print_table(result: dict) -> None:
    print(f"device: {result['device']}")
    print(
        f"{'model':16} {'variant':10} {'ranks':>5} {'ep':>3} {'img':>4} {'ms':>9} {'spread':>7} "
        f"{'samp/s':>7} {'vs dense':>8} {'exp.comm':>8} {'syncs':>5} {'mfu':>6} {'mem MB':>8}"
    )
    for c in result["cases"]:
        ratio = f"{c['ratio_vs_dense']:.3f}" if c["ratio_vs_dense"] is not None else "-"
        print(
            f"{c['model']:16} {c.get('variant', ''):10} {c['ranks']:>5} {c['ep']:>3} "
            f"{c['images_per_rank']:>4} {c['ms_median']:>9.1f} {c['ms_spread']:>7.1f} "
            f"{c['samples_per_s']:>7.2f} {ratio:>8} {100 * c['exposed_comm_frac']:>7.1f}% "
            f"{c['host_syncs_per_step']:>5} {100 * c['mfu_vs_measured_peak']:>5.1f}% "
            f"{c['peak_mem_mb']:>8.1f}"
        )
