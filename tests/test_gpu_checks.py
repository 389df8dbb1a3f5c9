"""tools/gpu_smoke_checks.py (diffmoe_dist/parallel/gpu_checks.py) on 2 gloo ranks: the wiring of the GPU
smoke checks, run for real on CPU. What only NCCL and CUDA show (device choice among GPUs, CUDA-event
timing, NCCL refusing host tensors) is checked by tools/gpu_smoke.sh on a GPU machine; here each check
runs its CPU branch, and a check that raises is reported as failed with exit code 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_checks_run_on_two_cpu_ranks(tmp_path: Path) -> None:
    out = tmp_path / "checks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(REPO / "tools" / "gpu_smoke_checks.py"), "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    # Known, seen once in 4 runs (2026-12-01): after every check passed and rank 0 wrote the result,
    # a rank can abort in gloo's teardown ("terminate called without an active exception", SIGABRT)
    # -- the rank0_wait check deliberately outlasts the group's 10 s timeout. That exit is tolerated
    # ONLY with that message; any other non-zero exit fails, and the checks themselves must pass.
    teardown_abort = "terminate called without an active exception" in proc.stderr
    assert proc.returncode == 0 or (teardown_abort and out.exists()), log
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    names = {
        "wrappers",
        "device",
        "rank0_wait",
        "a2a_timing",
        "bf16_dispatch",
        "deterministic_index_add",
    }
    assert names <= set(res), sorted(res)
    assert all(res[n]["ok"] for n in names), {n: res[n] for n in names if not res[n]["ok"]}
    # The bf16 check compares real dispatch byte counts: bf16 tokens are half of fp32's.
    m = re.search(r"fp32 (\d+) B, bf16 (\d+) B", res["bf16_dispatch"]["detail"])
    assert m and int(m[1]) > 0 and int(m[1]) == 2 * int(m[2]), res["bf16_dispatch"]
