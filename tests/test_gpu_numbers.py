"""tools/gpu_numbers.sh wiring, run on CPU with a tiny config (the GPU run itself needs a GPU).

Checks that the script produces what docs/benchmarks.md is filled from: a valid bench.json and a
one-row results table whose model TFLOP/s follow from its samples/s; and that it refuses to write
over earlier results.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from helpers_run import REPO, TINY, _env

from diffmoe_dist.bench.moe_bench import validate_result
from diffmoe_dist.config import load_config
from diffmoe_dist.models.flops import train_flops_per_sample

SMALL = {
    "DEVICE": "cpu",
    "CONFIG": str(TINY),
    "MICRO": "8",
    "STEPS": "3",
    "WARMUP": "1",
    "WIDTHS": "32",
    "EXPERTS": "4",
    "TOKENS": "512",
    "REPEATS": "1",
    "PRECISION": "bf16",
    "STEP_SIZES": "S",
    "STEP_IMAGES": "2",
    "STEP_ARGS": "--set=model.input_size=8 --set=model.depth=2 --set=model.hidden_size=32 "
    "--set=model.num_heads=2 --set=model.num_classes=10 --set=moe.num_experts=4 "
    "--warmup=1 --repeats=1",
}


def _run(out: Path) -> subprocess.CompletedProcess:
    env = {**_env(), **SMALL}
    return subprocess.run(
        ["bash", "tools/gpu_numbers.sh", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_gpu_numbers_script_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "numbers"
    res = _run(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    bench = json.loads((out / "bench.json").read_text())
    validate_result(bench)
    assert {c["mode"] for c in bench["cases"]} == {"dense", "tc", "ec", "diffmoe"}
    (row,) = list(csv.DictReader(open(out / "results.csv")))
    assert row["status"] == "ok" and row["global_batch"] == "8" and row["pool_samples"] == "8"
    cfg = load_config(TINY)
    per_sample = train_flops_per_sample(cfg.model, dataclasses.replace(cfg.moe, pool_samples=8))
    assert float(row["tflops_per_rank"]) == pytest.approx(
        float(row["samples_per_s_per_rank"]) * per_sample / 1e12, rel=2e-3
    )
    assert "device cpu" in (out / "machine.txt").read_text()
    # a throughput run writes no checkpoint (32 GB for L-E16 on a GPU)
    assert not [p for p in out.rglob("step-*") if p.is_dir()], sorted(out.rglob("step-*"))
    assert list(out.rglob("metrics.jsonl"))
    # 3/3: the training-step benchmark's JSON (issue 15 shape), DiffMoE against Dense-DiT
    from diffmoe_dist.bench.step_bench import validate_result as validate_step

    step = json.loads((out / "step.json").read_text())
    validate_step(step)
    assert [(c["model"], c["ranks"]) for c in step["cases"]] == [
        ("Dense-DiT-S", 1),
        ("DiffMoE-S-E16", 1),
    ]
    assert "DiffMoE-S-E16" in res.stdout  # the table printed from step.json
    again = _run(out)
    assert again.returncode == 2 and "already has results" in again.stderr
