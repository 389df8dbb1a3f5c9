"""tools/scaling_study.py on 1, 2 and 4 CPU ranks (tiny config): the table, the plots, loss curves
that agree (the model is held fixed), a failing layout recorded as failed, refused sweeps.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_run import REPO, TINY, _env, losses

from diffmoe_dist.config import load_config
from diffmoe_dist.models.flops import train_flops_per_sample
from diffmoe_dist.studies.common import PACKAGE_ROOT, run_logged
from diffmoe_dist.studies.scaling_study import (
    ScalingSpec,
    SweepPoint,
    parse_layouts,
    plan_sweep,
    slurm_command,
)

STEPS = 3
# The 4th layout is valid but fails at start-up on a CPU-only machine (nccl without CUDA).
LAYOUTS = (
    "nodes=1,nproc=1,ep=1,micro=16; nodes=1,nproc=2,ep=2,micro=8; nodes=1,nproc=4,ep=4,micro=4; "
    "nodes=1,nproc=2,ep=1,micro=8,parallel.backend=nccl"
)
LOSS_TOL = 1e-5  # float rounding between layouts, as in tests/test_trainer.py


def _study(out: Path, layouts: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/scaling_study.py", "--config", str(TINY), "--layouts", layouts]
    cmd += ["--steps", str(STEPS), "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    if __import__("torch").cuda.is_available():
        pytest.skip("the deliberately failing layout (nccl without CUDA) would succeed on a GPU")
    out = tmp_path_factory.mktemp("scaling")
    return out, _study(out, LAYOUTS)


def test_table_rows_and_plots(study: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, res = study
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]  # one layout failed
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["layout"] for r in rows] == [
        "n1-p1-ep1-m16",
        "n1-p2-ep2-m8",
        "n1-p4-ep4-m4",
        "n1-p2-ep1-m8-x4",
    ]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert [int(r["world"]) for r in rows] == [1, 2, 4, 2]
    assert {r["pool_samples"] for r in rows} == {"4"} and {r["global_batch"] for r in rows} == {
        "16"
    }
    for r in rows[:3]:
        for key in ("samples_per_s_per_rank", "scaling_eff", "peak_mem_mb", "load_skew"):
            assert float(r[key]) > 0, (r["layout"], key)
        # model TFLOP/s per rank is samples/s per rank x the model's FLOPs per sample (no peak on
        # CPU, so no MFU)
        cfg = load_config(TINY)
        per_sample = train_flops_per_sample(cfg.model, cfg.moe)
        assert float(r["tflops_per_rank"]) == pytest.approx(  # both rounded to 4 digits
            float(r["samples_per_s_per_rank"]) * per_sample / 1e12, rel=2e-3
        )
        assert r["mfu"] == ""
        assert 0 <= float(r["a2a_share"]) < 1
    assert float(rows[0]["scaling_eff"]) == 1.0 and float(rows[0]["a2a_share"]) == 0.0
    assert float(rows[1]["a2a_share"]) > 0 and float(rows[2]["a2a_share"]) > 0  # ep > 1
    md = (out / "results.md").read_text()
    assert md.count("\n| n1-") == 4 and "failed" in md
    assert "Versions: python" in md and "git commit" in md  # what produced the numbers
    for png in ("scaling.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 1000


def test_loss_curves_agree_across_layouts(study: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = study
    ref = losses(out / "runs" / "n1-p1-ep1-m16")
    assert sorted(ref) == list(range(1, STEPS + 1))
    for name in ("n1-p2-ep2-m8", "n1-p4-ep4-m4"):
        got = losses(out / "runs" / name)
        assert sorted(got) == sorted(ref)
        worst = max(abs(got[s] - ref[s]) for s in ref)
        assert worst <= LOSS_TOL, f"{name}: max |loss diff| {worst:.3g} ({got} vs {ref})"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert all(float(r["max_loss_diff"]) <= LOSS_TOL for r in rows[:3])


def test_failed_layout_recorded(study: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, res = study
    row = list(csv.DictReader(open(out / "results.csv")))[3]
    assert row["status"] == "failed" and row["returncode"] != "0"
    assert "nccl" in row["error"], row["error"]
    assert "FAILED" in res.stdout and (out / "runs" / "n1-p2-ep1-m8-x4.log").is_file()


def test_pool_changing_sweeps_refused(tmp_path: Path) -> None:
    base = "nodes=1,nproc=1,ep=1,micro=16"
    cases = {
        # an explicit pool that differs from the config's moe.pool_samples=4
        f"{base}; nodes=1,nproc=2,ep=2,micro=8,pool=8": "layout 2 .*pool_samples=8",
        # micro-batch 2 cannot hold a pool of 4 and ep=1 cannot span it
        f"{base}; nodes=1,nproc=8,ep=1,micro=2": "layout 2 .*cannot realise moe.pool_samples=4",
        # a different global batch would change the model
        f"{base}; nodes=1,nproc=2,ep=2,micro=4": "layout 2 .*global batch 2x4=8",
    }
    for spec, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern):
            plan_sweep(TINY, parse_layouts(spec), tmp_path)
    with pytest.raises(ValueError, match="would change the model"):
        parse_layouts("nodes=1,nproc=1,ep=1,micro=16,moe.pool_samples=8")
    with pytest.raises(ValueError, match="missing micro"):
        parse_layouts("nodes=1,nproc=1,ep=1")
    res = _study(tmp_path / "refused", f"{base}; nodes=1,nproc=2,ep=2,micro=8,pool=8")
    assert res.returncode == 2 and "refused: layout 2" in res.stderr
    assert not (tmp_path / "refused" / "runs").exists()  # nothing ran


def test_slurm_command_built(tmp_path: Path) -> None:
    plans = plan_sweep(
        TINY, [SweepPoint(1, nodes=2, nproc=4, ep=4, micro=2)], tmp_path, launcher="slurm"
    )
    cmd, env = slurm_command(plans[0], TINY, REPO, ["--gpus-per-node=4"])
    assert cmd[:3] == ["sbatch", "--wait", "--nodes=2"] and "--gpus-per-node=4" in cmd
    assert cmd[cmd.index("--gpus-per-node=4") + 1].endswith("launchers/slurm_train.sh")
    assert "parallel.ep=4" in cmd and "train.global_batch_size=16" in cmd
    assert env["NPROC_PER_NODE"] == "4" and env["RUN_DIR"].endswith("n2-p4-ep4-m2")
    assert env["REPO_DIR"] == str(REPO)
    with pytest.raises(ValueError, match="needs --launcher slurm"):
        plan_sweep(TINY, [SweepPoint(1, nodes=2, nproc=4, ep=4, micro=2)], tmp_path)
    # The package takes the checkout explicitly: a directory without the launcher is refused.
    with pytest.raises(ValueError, match="launchers/slurm_train.sh .* has none"):
        ScalingSpec(TINY, [plans[0].point], launcher="slurm", checkout=tmp_path)


def test_dry_run_prints_commands(tmp_path: Path) -> None:
    """--dry-run: one command per layout (torchrun for several ranks), nothing written."""
    res = _study(tmp_path / "dry", "nodes=1,nproc=1,ep=1,micro=16; nodes=1,nproc=2,ep=2,micro=8",
                 "--dry-run")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and "-m diffmoe_dist.train" in lines[0]
    assert "torch.distributed.run" not in lines[0] and "--nproc-per-node=2" in lines[1]
    assert "parallel.ep=2" in lines[1] and not (tmp_path / "dry").exists()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a killed process waiting to be reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_run_logged_timeout_kills_every_process_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The studies' launcher (studies/common.py), caused rather than mocked: a run past its timeout
    is killed with the process it started (as torchrun's workers), rc 124; a failed run reports its
    own "error:" line; the child sees no launcher identity and this package first on its path."""
    pidfile = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(300)"
    )
    out = run_logged([sys.executable, "-c", code], tmp_path / "slow.log", timeout_s=3)
    assert out.returncode == 124 and out.error == "timed out after 3s"
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the run's own child outlived the timeout"

    monkeypatch.setenv("RANK", "3")
    code = (
        "import os, sys; print(os.environ.get('RANK'), os.environ['PYTHONPATH']); "
        "print('x: error: bad --flag 7', file=sys.stderr); sys.exit(2)"
    )
    out = run_logged([sys.executable, "-c", code], tmp_path / "fail.log", {"A": "1"})
    assert out.returncode == 2 and out.error == "x: error: bad --flag 7"
    env_line = out.log.read_text().splitlines()[1]
    assert env_line.split()[0] == "None" and env_line.split()[1].startswith(str(PACKAGE_ROOT))
    with pytest.raises(RuntimeError, match=r"rc 2(.|\n)*bad --flag 7"):
        out.check()
