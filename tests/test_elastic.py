"""A killed rank under torchrun's elastic agent: the group restarts from the latest checkpoint and
finishes with exactly the weights of an uninterrupted run (issue 6, item 4).

Real processes: ``torchrun --standalone --nproc-per-node 2 --max-restarts 1``, gloo, ep=2 with pools
spanning both ranks; one worker gets SIGKILL (no chance to clean up) after a checkpoint exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from helpers_run import (
    REPO,
    TINY,
    _env,
    checkpoint_tensors,
    checkpoints,
    finish,
    latest_checkpoint,
    losses,
    run_train,
    wait_for_step,
    worker_pids,
)

STEPS = 16
OVERRIDES = (f"train.steps={STEPS}", "train.ckpt_every=4", "parallel.ep=2", "moe.pool_samples=16")


def _start_elastic(run_dir: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "-m",
        "diffmoe_dist.train",
        "--config",
        str(TINY),
    ]
    for item in (f"run.dir={run_dir}", "run.progress=false", *OVERRIDES):
        cmd += ["--set", item]
    logs = Path(tempfile.mkdtemp(prefix="elastic-log-"))
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(),
        stdout=open(logs / "stdout", "w"),  # noqa: SIM115
        stderr=open(logs / "stderr", "w"),
        start_new_session=True,
    )  # noqa: SIM115
    proc.log_dir = logs  # type: ignore[attr-defined]
    return proc


def test_kill_9_one_worker_restarts_from_checkpoint_with_identical_final_weights(
    tmp_path: Path,
) -> None:
    ref_dir = tmp_path / "reference"
    run_train(ref_dir, *OVERRIDES, nproc=2, timeout_s=300).check()

    run_dir = tmp_path / "killed"
    proc = _start_elastic(run_dir)
    wait_for_step(run_dir, 6, proc, timeout_s=240)  # a checkpoint at step 4 exists by now
    assert checkpoints(run_dir), "expected a checkpoint before the kill"
    victim = worker_pids(proc, 2)[1]
    os.kill(victim, signal.SIGKILL)
    rc, out, err = finish(proc, timeout_s=300)
    assert rc == 0, f"torchrun did not recover (rc {rc}):\n{out[-2000:]}\n{err[-3000:]}"
    # The agent really restarted the group (the log says so) and the run resumed from a checkpoint.
    assert "resumed from" in out, out[-2000:]

    # The loss curve is the uninterrupted one, step for step (steps redone after the restart are
    # truncated from metrics.jsonl, so each step appears once).
    ref_curve, curve = losses(ref_dir), losses(run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    for step, value in ref_curve.items():
        assert abs(curve[step] - value) <= 1e-6 * max(1.0, abs(value)), (step, curve[step], value)

    ref_state = checkpoint_tensors(latest_checkpoint(ref_dir))
    state = checkpoint_tensors(latest_checkpoint(run_dir))
    assert latest_checkpoint(run_dir).name == f"step-{STEPS:08d}"
    keys = [k for k in ref_state if k.startswith(("model.", "ema.", "optim."))]
    assert keys and set(keys) <= set(state)
    for k in keys:
        a, b = ref_state[k], state[k]
        # Same ops in the same order on the same CPU: the restarted run is bitwise reproducible.
        assert torch.equal(a, b), f"{k} differs after the elastic restart"
