"""Run the trainer the way users do (a subprocess, or under torchrun) and read what it wrote.

    res = run_train(run_dir, "train.steps=3", nproc=2)     # diffmoe-train, blocking, with a timeout
    res.check()                                            # raise with stdout/stderr unless rc == 0
    curve = losses(run_dir)                                # {step: loss} from metrics.jsonl
    state = checkpoint_tensors(latest_checkpoint(run_dir)) # every tensor of a DCP checkpoint

    proc = start_train(run_dir, "train.steps=30")          # non-blocking (preemption tests)
    wait_for_step(run_dir, 2, proc); signal_workers(proc, signal.SIGUSR1)

``nproc > 1`` runs ``torchrun --standalone --nproc-per-node N`` (gloo, CPU). Every process gets
OMP_NUM_THREADS=1 (the test machine has 2 shared cores). A run that outlives ``timeout_s`` is killed
with its whole process group and reported, so a hung collective fails a test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffmoe_dist.trainer.metrics import read_metrics  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # A test may itself run under torchrun/SLURM; the child must not inherit that rank identity.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_cmd(
    run_dir: str | os.PathLike[str],
    overrides: tuple[str, ...] = (),
    config: Any = TINY,
    nproc: int = 1,
) -> list[str]:
    """The command line of one run: ``diffmoe-train`` or ``torchrun ... -m diffmoe_dist.train``."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = launcher + ["-m", "diffmoe_dist.train", "--config", str(config)]
    for item in (f"run.dir={run_dir}", "run.progress=false", *overrides):
        cmd += ["--set", item]
    return cmd


@dataclass
class RunResult:
    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    def check(self) -> RunResult:
        if self.returncode != 0:
            raise AssertionError(
                f"run failed (rc {self.returncode}): {' '.join(self.cmd)}\n"
                f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"
            )
        return self


def run_train(
    run_dir: str | os.PathLike[str],
    *overrides: str,
    config: Any = TINY,
    nproc: int = 1,
    timeout_s: float = 240.0,
) -> RunResult:
    """Run to completion (or failure); never raises for a non-zero exit, see RunResult.check."""
    cmd = train_cmd(run_dir, overrides, config, nproc)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a timeout can kill torchrun and its workers together
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"run timed out after {timeout_s}s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}"
        ) from None
    return RunResult(cmd, proc.returncode, out, err, Path(run_dir))


def start_train(
    run_dir: str | os.PathLike[str], *overrides: str, config: Any = TINY, nproc: int = 1
) -> subprocess.Popen:
    """Start a run without waiting; output goes to files in a temporary directory (no pipe stalls)."""
    logs = Path(tempfile.mkdtemp(prefix="train-log-"))
    proc = subprocess.Popen(
        train_cmd(run_dir, overrides, config, nproc),
        cwd=REPO,
        env=_env(),
        stdout=open(logs / "stdout", "w"),  # noqa: SIM115 - closed with the process
        stderr=open(logs / "stderr", "w"),  # noqa: SIM115
        start_new_session=True,
    )
    proc.log_dir = logs  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout_s: float = 240.0) -> tuple[int, str, str]:
    """Wait for a start_train process; return (rc, stdout, stderr); kill it on timeout."""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"run timed out after {timeout_s}s: {proc.args}") from None
    logs: Path = proc.log_dir  # type: ignore[attr-defined]
    return rc, (logs / "stdout").read_text(), (logs / "stderr").read_text()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the session this helper started for ``proc`` (its own process group only)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def worker_pids(proc: subprocess.Popen, nproc: int, timeout_s: float = 60.0) -> list[int]:
    """PIDs of the training processes: proc itself, or torchrun's ``nproc`` worker children."""
    if nproc == 1:
        return [proc.pid]
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kids = psutil.Process(proc.pid).children(recursive=False)
        if len(kids) >= nproc:
            return [k.pid for k in kids]
        time.sleep(0.05)
    raise AssertionError(f"torchrun did not start {nproc} workers within {timeout_s}s")


def signal_workers(proc: subprocess.Popen, sig: int, nproc: int = 1) -> list[int]:
    """Send ``sig`` to the workers only (as SLURM's --signal does to the step), not the torchrun agent."""
    pids = worker_pids(proc, nproc)
    for pid in pids:
        os.kill(pid, sig)
    return pids


# ----------------------------------------------------------------------------------------------------
# what a run leaves behind


def losses(run_dir: str | os.PathLike[str], key: str = "loss") -> dict[int, float]:
    """{step: value} of one metric; a step logged twice is an error (resume must truncate)."""
    out: dict[int, float] = {}
    for rec in read_metrics(run_dir):
        step = int(rec["step"])
        assert step not in out, f"step {step} logged twice in {run_dir}/metrics.jsonl"
        out[step] = float(rec[key])
    return out


def wait_for_step(
    run_dir: str | os.PathLike[str], step: int, proc: subprocess.Popen, timeout_s: float = 120.0
) -> int:
    """Block until metrics.jsonl has logged ``step`` (or later); return the last logged step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            recs = read_metrics(run_dir)
        except json.JSONDecodeError:  # a line being written
            recs = []
        if recs and int(recs[-1]["step"]) >= step:
            return int(recs[-1]["step"])
        if proc.poll() is not None:
            raise AssertionError(f"run exited (rc {proc.returncode}) before logging step {step}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not logged within {timeout_s}s")


def checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Published checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(root.glob("step-*")) if root.is_dir() else []


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path:
    found = checkpoints(run_dir)
    assert found, f"no checkpoint in {run_dir}"
    return found[-1]


def checkpoint_tensors(ckpt_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor a DCP checkpoint holds, read with torch's own converter (not the project's loader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(ckpt_dir), str(out))
        return torch.load(out, weights_only=False)


def dir_fingerprint(path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """{relative file: (size, mtime_ns)}: shows whether a failed start touched a run directory.

    The run's lock file (diffmoe_dist/trainer/runlock.py) is left out: any trainer start takes the lock and
    writes its host / pid there first; that is the lock working, not run state."""
    from diffmoe_dist.trainer.runlock import LOCK_NAME

    root = Path(path)
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


@contextmanager
def restored_signal_handlers() -> Iterator[None]:
    """An in-process Trainer installs SIGUSR1/SIGTERM/SIGINT handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def train_in_process(run_dir: Path | str, *overrides: str, config: Path | str = TINY) -> int:
    """diffmoe-train's main() in this process (run.dir, no progress bar, ``overrides`` as --set);
    returns its exit code. Signal handlers the Trainer installs are given back afterwards."""
    from diffmoe_dist.train import main as train_main

    argv = ["--config", str(config), "--set", f"run.dir={run_dir}", "--set", "run.progress=false"]
    for o in overrides:
        argv += ["--set", o]
    with restored_signal_handlers():
        return train_main(argv)
