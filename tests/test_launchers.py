"""Launch paths without a scheduler: rank resolution (torchrun / MPI / SLURM / single) and the
single-node launchers (launchers/torchrun_local.sh, launchers/mpirun_train.sh), run for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from diffmoe_dist.parallel.launch_env import LaunchEnv, detect_launch_source, resolve_launch_env

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PMI_RANK",
    "PMI_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "PMIX_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_STEP_ID",
    "SLURM_LOCALID",
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No launcher variables in os.environ; monkeypatch restores whatever resolve_launch_env sets."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---- resolve_launch_env ---------------------------------------------------------------------------
def test_single_process_exports_env(clean_env: pytest.MonkeyPatch) -> None:
    env = resolve_launch_env()
    assert env.source == "single"
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0"
    assert int(os.environ["MASTER_PORT"]) == env.master_port > 0


def test_torchrun_env_is_used_as_is(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in dict(
        RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="node1", MASTER_PORT="29511"
    ).items():
        clean_env.setenv(k, v)
    clean_env.setenv("PMI_RANK", "0")  # torchrun wins over an outer MPI launcher
    assert resolve_launch_env() == LaunchEnv(3, 4, 1, "node1", 29511, "torchrun")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
        (
            {
                "RANK": "x",
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "a",
                "MASTER_PORT": "1",
            },
            "RANK='x' is not an integer",
        ),
        (
            {
                "RANK": "2",
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "a",
                "MASTER_PORT": "1",
            },
            r"rank 2 is outside \[0, 2\)",
        ),
    ],
)
def test_inconsistent_torchrun_env_is_a_clear_error(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        resolve_launch_env()


def test_srun_without_torchrun(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in dict(
        SLURM_PROCID="1",
        SLURM_NTASKS="2",
        SLURM_STEP_ID="0",
        SLURM_LOCALID="1",
        SLURM_JOB_ID="1234",
    ).items():
        clean_env.setenv(k, v)
    env = resolve_launch_env()
    assert (env.source, env.rank, env.world_size, env.local_rank) == ("slurm", 1, 2, 1)
    assert env.master_port == 20000 + 1234  # identical on every task without communication


def test_batch_step_alone_is_not_a_multi_rank_launch(clean_env: pytest.MonkeyPatch) -> None:
    # The batch shell has SLURM_PROCID/SLURM_NTASKS but no step: a bare `python -m ...` there is
    # one process, and must not wait for SLURM_NTASKS peers that will never come.
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    assert detect_launch_source() == "single"


MPI_PROGRAM = textwrap.dedent(
    """
    import datetime, json, sys, torch, torch.distributed as dist
    from pathlib import Path
    from diffmoe_dist.parallel.launch_env import resolve_launch_env
    env = resolve_launch_env()
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)
    row = {**env.__dict__, "sum": t.item(), "torch_rank": dist.get_rank()}
    # one file per rank: mpiexec merges the ranks' stdout, and lines can interleave
    (Path(sys.argv[1]) / f"rank{env.rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()
    """
)


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec (mpich wheel) not installed")
def test_mpiexec_ranks_and_all_reduce(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py")
    proc = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, "-c", MPI_PROGRAM, str(tmp_path)],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(rows) == 2, proc.stdout
    assert {r["source"] for r in rows} == {"mpi"}
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert all(r["torch_rank"] == r["rank"] for r in rows)
    assert sorted(r["local_rank"] for r in rows) == [0, 1]  # both on this host
    assert {r["world_size"] for r in rows} == {2}
    assert len({(r["master_addr"], r["master_port"]) for r in rows}) == 1  # broadcast from rank 0
    assert [r["sum"] for r in rows] == [3.0, 3.0]  # 1 + 2


ELASTIC_PROGRAM = textwrap.dedent(
    """
    import datetime, os, sys, torch, torch.distributed as dist
    from pathlib import Path
    from diffmoe_dist.parallel.launch_env import resolve_launch_env
    env = resolve_launch_env()
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    group = dist.new_group([0, 1])
    if attempt == 0 and env.rank == 1:
        os._exit(1)  # dies after its group keys are in the store, like a killed worker
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    (Path(sys.argv[1]) / f"rank{env.rank}.txt").write_text(f"attempt {attempt} sum {t.item()}")
    dist.destroy_process_group()
    """
)


def test_torchrun_restart_gets_a_fresh_store(tmp_path: Path) -> None:
    """After a torchrun restart, groups must not see the dead attempt's store keys (plain env://
    on the agent store fails here with "connectFullMesh ... Connection refused")."""
    program = tmp_path / "elastic.py"
    program.write_text(ELASTIC_PROGRAM)
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node=2", "--max-restarts=1", str(program)]
        + [str(tmp_path)],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [p.read_text() for p in sorted(tmp_path.glob("rank*.txt"))]
    assert results == ["attempt 1 sum 2.0", "attempt 1 sum 2.0"]  # both ranks, after the restart


# ---- the single-node launchers --------------------------------------------------------------------
def _run_launcher(script: str, env: dict[str, str], *args: str, timeout: int = 300):
    return subprocess.run(
        [str(REPO / "launchers" / script), *args],
        env={**_child_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("script", "env", "message"),
    [
        (
            "torchrun_local.sh",
            {"CONFIG": "configs/nope.yaml"},
            "config file 'configs/nope.yaml' does not exist",
        ),
        ("torchrun_local.sh", {"NPROC": "two"}, "NPROC='two' is not a positive number"),
        ("torchrun_local.sh", {"RUN_DIR": "/proc/diffmoe/run"}, "cannot create run dir"),
        (
            "mpirun_train.sh",
            {"CONFIG": "configs/nope.yaml"},
            "config file 'configs/nope.yaml' does not exist",
        ),
        ("mpirun_train.sh", {"NP": "0"}, "NP='0' is not a positive number"),
        ("mpirun_train.sh", {"MPIEXEC": "no-such-mpiexec"}, "'no-such-mpiexec' not found"),
    ],
)
def test_launcher_bad_input(script: str, env: dict[str, str], message: str) -> None:
    proc = _run_launcher(script, env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def _losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec (mpich wheel) not installed")
def test_torchrun_and_mpirun_launchers_train_identically(tmp_path: Path) -> None:
    """Both launchers, 2 ranks, ep=2: same run, so the same loss at every step."""
    pytest.importorskip("mpi4py")
    overrides = ["--set", "parallel.ep=2", "--set", "train.steps=4", "--set", "train.ckpt_every=2"]
    runs = {}
    for script, knob in (("torchrun_local.sh", "NPROC"), ("mpirun_train.sh", "NP")):
        run_dir = tmp_path / script.split("_")[0]
        proc = _run_launcher(script, {knob: "2", "RUN_DIR": str(run_dir)}, *overrides)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert json.loads((run_dir / "final.json").read_text())["step"] == 4
        assert (run_dir / "checkpoints" / "step-00000004" / "manifest.json").is_file()
        runs[script] = _losses(run_dir)
    torchrun, mpirun = runs.values()
    assert sorted(torchrun) == [1, 2, 3, 4]
    assert mpirun == pytest.approx(torchrun, rel=1e-6, abs=1e-7)


def _final_state(run_dir: Path, step: int) -> dict:
    """The checkpoint at `step` as one flat dict (model, EMA, optimizer, RNG), read without ranks."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run_dir / f"state-{step}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step-{step:08d}", out)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_and_matches(tmp_path: Path) -> None:
    """kill -9 of one worker under torchrun --max-restarts=1: the agent restarts the group, the
    trainer resumes from the latest checkpoint, and the final weights, EMA, optimizer state and
    every step's loss equal an uninterrupted run's exactly."""
    import psutil
    import torch

    steps = 30
    overrides = ["--set", "parallel.ep=2", "--set", f"train.steps={steps}"]
    overrides += ["--set", "train.ckpt_every=5", "--set", "train.log_every=1"]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ref = _run_launcher("torchrun_local.sh", {"NPROC": "2", "RUN_DIR": str(ref_dir)}, *overrides)
    assert ref.returncode == 0, ref.stderr[-3000:]

    log = (tmp_path / "killed.log").open("w")
    agent = subprocess.Popen(
        [str(REPO / "launchers" / "torchrun_local.sh"), *overrides],
        env={**_child_env(), "NPROC": "2", "RUN_DIR": str(run_dir), "MAX_RESTARTS": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        killed = None
        while time.monotonic() < deadline and agent.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and max(_losses(run_dir), default=0) >= 7:  # past checkpoint 5
                workers = psutil.Process(agent.pid).children()
                victim = [w for w in workers if w.environ().get("LOCAL_RANK") == "1"]
                assert len(victim) == 1, [w.cmdline() for w in workers]
                victim[0].kill()  # SIGKILL: no handler, no checkpoint, no goodbye
                killed = max(_losses(run_dir))
                break
            time.sleep(0.1)
        assert killed is not None, "the run finished or stalled before a worker could be killed"
        assert agent.wait(timeout=300) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
        log.close()
    text = (tmp_path / "killed.log").read_text()
    assert killed < steps
    # Steps after the last checkpoint before the kill were logged twice: the resumed values win.
    assert _losses(run_dir) == _losses(ref_dir)
    assert json.loads((run_dir / "final.json").read_text())["step"] == steps
    assert "exitcode: -9" in text and "local_rank: 1" in text  # the kill happened
    resumed = re.findall(r"resumed from \S+/step-(\d+) ", text)  # the restart used a checkpoint
    assert resumed and 0 < int(resumed[-1]) < steps, text[-3000:]
    got, want = _final_state(run_dir, steps), _final_state(ref_dir, steps)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key


# ---- GPU counting (launchers/gpus.sh) ---------------------------------------------------------------
# No GPU here: the physical count is injected with a stand-in `nvidia-smi` that lists 8 GPUs, which is
# what a bare 8-GPU node reports whatever CUDA_VISIBLE_DEVICES or SLURM allocated to the job.
GPU_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "SLURM_JOB_ID",
    "SLURM_STEP_GPUS",
    "SLURM_JOB_GPUS",
    "SLURM_GPUS_ON_NODE",
)


@pytest.fixture(scope="module")
def fake_smi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bin_dir = tmp_path_factory.mktemp("fake_bin")
    smi = bin_dir / "nvidia-smi"
    lines = "\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})" for i in range(8))
    smi.write_text(f"#!/bin/sh\ncat <<'X'\n{lines}\nX\n")
    smi.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, 8),  # no scheduler, nothing set: every GPU nvidia-smi lists
        ({"CUDA_VISIBLE_DEVICES": "2,5"}, 2),
        ({"CUDA_VISIBLE_DEVICES": ""}, 0),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, 0),
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0,1,2,3"}, 4),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_GPUS": "3", "SLURM_JOB_GPUS": "0,1,2,3"}, 1),
        ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "4"}, 4),
        ({"SLURM_JOB_ID": "7"}, 0),  # a job allocated no GPU, on a node that has 8
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "1"}, 1),
    ],
)
def test_count_gpus(fake_smi: Path, env: dict[str, str], want: int) -> None:
    base = {k: v for k, v in os.environ.items() if k not in GPU_ENV}
    base["PATH"] = f"{fake_smi}{os.pathsep}{base['PATH']}"
    proc = subprocess.run(
        ["bash", "-c", f"source {REPO / 'launchers' / 'gpus.sh'}; count_gpus"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(want)


def test_torchrun_local_device_cuda_refuses_without_gpu() -> None:
    proc = _run_launcher("torchrun_local.sh", {"DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert "DEVICE=cuda but no GPU is visible" in proc.stderr
