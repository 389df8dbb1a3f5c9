"""launchers/slurm_train.sh on a real local SLURM cluster (tools/slurm_cluster.sh: munge, slurmctld
and two emulated slurmd nodes on this host).

Jobs are polled with `scontrol show job` (sbatch --wait can return ~30 s late). Every job writes its
log under the test's tmp dir; a failing assertion prints the log tail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tools" / "slurm_cluster.sh"
LAUNCHER = REPO / "launchers" / "slurm_train.sh"
STATE_DIR = Path(os.environ.get("SLURM_STATE_DIR", "/tmp/diffmoe-slurm"))
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# A run long enough to be interrupted mid-way; the 1-node run is also the uninterrupted reference.
STEPS = 60
TRAIN_ARGS = [
    "--set",
    "parallel.ep=2",
    "--set",
    f"train.steps={STEPS}",
    "--set",
    "train.log_every=1",
    "--set",
    "train.ckpt_every=5",
]


# ---- cluster and job helpers ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """Start (or reuse) the local cluster; stop it afterwards only if this session started it."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it starts munged/slurmctld/slurmd)")
    install = subprocess.run([str(CLUSTER), "install"], capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        if shutil.which("slurmctld") is None:
            pytest.skip(f"apt could not install SLURM: {install.stderr.strip()[-500:]}")
        pytest.fail(f"slurm_cluster.sh install failed:\n{install.stderr}")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("RANK", "WORLD_SIZE")
    }
    env.update(SLURM_STATE_DIR=str(STATE_DIR), SLURM_CONF=str(STATE_DIR / "etc" / "slurm.conf"))
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # This cluster has no GPU: training jobs ask for CPU (without it the launcher refuses, tested below).
    env["DEVICE"] = "cpu"
    was_running = (
        subprocess.run([str(CLUSTER), "status"], env=env, capture_output=True).returncode == 0
    )
    start = subprocess.run(
        [str(CLUSTER), "start", "--nodes", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert start.returncode == 0, f"slurm_cluster.sh start failed:\n{start.stderr}"
    yield env
    if not was_running and not os.environ.get("DIFFMOE_KEEP_SLURM"):
        subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, timeout=60)


def sbatch(
    env: dict[str, str], log: Path, *args: str, extra_env: dict[str, str] | None = None
) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", *args],
        env={**env, **(extra_env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(env: dict[str, str], job_id: str, log: Path, timeout: float = 240) -> dict[str, str]:
    """Poll until the job reaches a final state; on timeout cancel it and fail with its log."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env, capture_output=True)
    pytest.fail(
        f"job {job_id} not finished after {timeout}s (state {info.get('JobState')})\n{tail(log)}"
    )


def tail(log: Path, n: int = 40) -> str:
    if not log.exists():
        return f"(no log at {log})"
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl (the last record wins if a step was logged twice)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def assert_complete_run(
    run_dir: Path, info: dict[str, str], log: Path, steps: int = STEPS
) -> dict[int, float]:
    assert info["JobState"] == "COMPLETED", tail(log)
    assert info["ExitCode"] == "0:0", tail(log)
    final = json.loads((run_dir / "final.json").read_text())
    assert final["step"] == steps and final["preempted"] is False
    ckpt = run_dir / "checkpoints" / f"step-{steps:08d}"
    assert (ckpt / "manifest.json").is_file(), sorted(p.name for p in run_dir.rglob("*"))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["meta"]["step"] == steps
    for name, entry in manifest["files"].items():  # every listed shard is there, at its size
        assert (ckpt / name).stat().st_size == entry["size"], name
    assert not (run_dir / "PREEMPTED").exists()
    per_step = losses(run_dir)
    assert sorted(per_step) == list(range(1, steps + 1))
    return per_step


# ---- infrastructure -------------------------------------------------------------------------------
def test_trivial_two_node_job(slurm_env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "hello.sh"
    script.write_text(
        "#!/bin/bash\nset -euo pipefail\n"
        "srun --ntasks-per-node=1 bash -c 'echo \"task $SLURM_PROCID on $SLURMD_NODENAME\"'\n"
    )
    log = tmp_path / "hello.out"
    job = sbatch(slurm_env, log, "--nodes=2", str(script))
    info = wait_job(slurm_env, job, log, timeout=60)
    assert info["JobState"] == "COMPLETED", tail(log)
    lines = sorted(line for line in log.read_text().splitlines() if line.startswith("task"))
    assert lines == ["task 0 on node1", "task 1 on node2"]


def test_cluster_start_is_idempotent(slurm_env: dict[str, str]) -> None:
    t0 = time.monotonic()
    again = subprocess.run(
        [str(CLUSTER), "start", "--nodes", "2"], env=slurm_env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert "already running with 2 node(s)" in again.stderr
    assert time.monotonic() - t0 < 30
    bad = subprocess.run([str(CLUSTER), "start", "--nodes", "3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--nodes must be 1 or 2" in bad.stderr


def test_launcher_outside_slurm_refuses(slurm_env: dict[str, str]) -> None:
    proc = subprocess.run(["bash", str(LAUNCHER)], env=slurm_env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "not inside a SLURM job" in proc.stderr


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        (
            {"CONFIG": "configs/does-not-exist.yaml"},
            "config file 'configs/does-not-exist.yaml' does not exist",
        ),
        ({"RUN_DIR": "/proc/diffmoe-run"}, "cannot create run dir '/proc/diffmoe-run'"),
        ({"DEVICE": "cuda"}, "no GPU allocated to this job"),
        (  # GPUs a job may use come from CUDA_VISIBLE_DEVICES / SLURM, not from nvidia-smi
            {"DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "0,1", "GPUS_PER_NODE": "64"},
            "GPUS_PER_NODE=64 but this job may use 2 GPU(s)",
        ),
        ({"DEVICE": "tpu"}, "DEVICE='tpu' is not cuda or cpu"),
        (
            {"RDZV_HOST": "no-such-head.invalid"},
            "rendezvous host 'no-such-head.invalid' does not resolve",
        ),
    ],
)
def test_bad_input_fails_fast_with_message(
    slurm_env: dict[str, str], tmp_path: Path, knobs: dict[str, str], message: str
) -> None:
    log = tmp_path / "job.out"
    knobs = {"RUN_DIR": str(tmp_path / "run"), **knobs}
    t0 = time.monotonic()
    job = sbatch(slurm_env, log, str(LAUNCHER), extra_env=knobs)
    info = wait_job(slurm_env, job, log, timeout=60)
    assert info["JobState"] == "FAILED", tail(log)
    assert info["ExitCode"] == "2:0"
    assert message in log.read_text(), tail(log)
    assert time.monotonic() - t0 < 45  # refused before anything was launched, no rendezvous wait


# ---- training end to end --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(
    slurm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[int, float]:
    """1 node x 2 ranks, gloo, ep=2, uninterrupted: the run the others are compared with."""
    tmp = tmp_path_factory.mktemp("slurm_ref")
    run_dir, log = tmp / "run", tmp / "job.out"
    job = sbatch(
        slurm_env, log, "--nodes=1", str(LAUNCHER), *TRAIN_ARGS, extra_env={"RUN_DIR": str(run_dir)}
    )
    info = wait_job(slurm_env, job, log)
    per_step = assert_complete_run(run_dir, info, log)
    assert "gloo on CPU" in log.read_text()
    return per_step


def test_train_one_node(reference_run: dict[int, float]) -> None:
    assert all(v == v and v > 0 for v in reference_run.values())  # finite, positive losses


def test_train_two_nodes(
    slurm_env: dict[str, str], tmp_path: Path, reference_run: dict[int, float]
) -> None:
    """2 nodes x 2 ranks: world 4, ep=2. The pool is part of the model, so the loss curve is the
    1-node one up to float rounding (gradients are averaged over 4 ranks instead of 2)."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(
        slurm_env, log, "--nodes=2", str(LAUNCHER), *TRAIN_ARGS, extra_env={"RUN_DIR": str(run_dir)}
    )
    info = wait_job(slurm_env, job, log)
    per_step = assert_complete_run(run_dir, info, log)
    assert info["NodeList"] == "node[1-2]"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["world_size"] for r in records} == {4}
    assert per_step == pytest.approx(reference_run, rel=1e-4)


def _wait_for_step(run_dir: Path, step: int, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.5)
    pytest.fail(f"run never reached step {step}\n{tail(log)}")


def _assert_resumed_identically(
    run_dir: Path, info: dict[str, str], log: Path, reference: dict[int, float], steps: int = STEPS
) -> None:
    per_step = assert_complete_run(run_dir, info, log, steps)
    text = log.read_text()
    assert int(info["Restarts"]) >= 1, tail(log)
    stops = [int(s) for s in re.findall(r'stopped early: \{"step": (\d+)\}', text)]
    assert stops and all(0 < s < steps for s in stops), tail(log)
    assert "requeueing job" in text
    # Not "close": the resumed run is the same computation (model, optimizer, RNG, data position).
    # A longer run shares the reference's first STEPS steps (constant lr, same data order).
    same_steps = {s: per_step[s] for s in reference}
    assert same_steps == pytest.approx(reference, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize(
    "scancel_args",
    [
        ["--signal=USR1"],  # to the job steps: the workers get it directly
        ["--batch", "--signal=USR1"],  # to the batch shell only: it forwards through srun
    ],
    ids=["step", "batch-shell"],
)
def test_preempt_usr1_requeues_and_resumes_identically(
    slurm_env: dict[str, str],
    tmp_path: Path,
    reference_run: dict[int, float],
    scancel_args: list[str],
) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(
        slurm_env, log, "--nodes=1", str(LAUNCHER), *TRAIN_ARGS, extra_env={"RUN_DIR": str(run_dir)}
    )
    _wait_for_step(run_dir, 3, log)
    subprocess.run(["scancel", *scancel_args, job], env=slurm_env, check=True)
    info = wait_job(slurm_env, job, log, timeout=300)
    _assert_resumed_identically(run_dir, info, log, reference_run)


@pytest.mark.slow
def test_pre_timeout_signal_requeues_and_continues(
    slurm_env: dict[str, str], tmp_path: Path
) -> None:
    """The `--signal=USR1@T` timer. With a 2-minute limit and T=60 s, SLURM signals the step 60-90 s
    after it starts (its timer runs every ~30 s), late enough that the workers have installed their
    handler even on a loaded host. The run is far longer than that, so it must save,
    requeue and continue from its checkpoint (every step logged exactly once, no restart from 0);
    the test then cancels it. Exact loss equality across a resume is test_preempt_usr1_...'s job."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(
        slurm_env,
        log,
        "--nodes=1",
        "--time=2",
        "--signal=USR1@60",
        str(LAUNCHER),
        *TRAIN_ARGS,
        "--set",
        "train.steps=1000000",
        "--set",
        "train.ckpt_every=1000000",
        extra_env={"RUN_DIR": str(run_dir)},
    )
    deadline = time.monotonic() + 300
    stops: list[int] = []
    try:
        while time.monotonic() < deadline:
            info = job_info(slurm_env, job)
            assert info.get("JobState") not in FINAL_STATES, tail(log)
            text = log.read_text() if log.exists() else ""
            stops = [int(s) for s in re.findall(r'stopped early: \{"step": (\d+)\}', text)]
            if stops and int(info.get("Restarts", 0)) >= 1 and (run_dir / "metrics.jsonl").exists():
                if max(losses(run_dir)) > stops[0] + 5:
                    break
            time.sleep(1)
        else:
            pytest.fail(f"no timer-driven save + requeue + progress within 300 s\n{tail(log)}")
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    # scancel (SIGTERM) must end the job for good: the launcher does not requeue after SIGTERM.
    info = wait_job(slurm_env, job, log, timeout=120)
    assert info["JobState"] == "CANCELLED", tail(log)
    assert "requeueing job" in log.read_text()
    assert stops[0] > 0
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(steps) == len(set(steps)), "a step was logged twice: the requeued run did not resume"
    assert sorted(steps) == list(range(1, max(steps) + 1))
