"""A run directory is never damaged (issue 14): each case is caused for real on configs/tiny.yaml.

- readers (diffmoe-sample / diffmoe-eval) verify what they load, fall back past a damaged latest
  checkpoint with a warning naming the file, and never write, delete or lock anything in
  ``checkpoints/`` (a stale ``.tmp-*`` save survives them);
- one trainer per run directory: a second one is refused at once naming the holder, the first goes
  on unharmed; kill -9 leaves no stale lock and the rerun resumes with each step logged once;
- a diverging learning rate (train.lr=1e4) stops the run non-zero naming the step and loss, with
  every kept checkpoint finite (stop), or skips the updates and stops after N in a row (skip_step);
- every checkpoint unreadable: refused naming them, unless train.allow_restart=true, which prunes
  nothing a newer good checkpoint has not superseded;
- metrics.jsonl holds each step once, in order, after kills before any checkpoint;
- Ctrl-C (SIGINT to torchrun's whole process group) saves at the agreed step boundary and exits;
  a second SIGINT exits at once; a stale PREEMPTED is removed;
- many diffmoe-sample calls against a trainer saving every step (keep 1): the trainer survives and
  every call uses a checkpoint that verified, or fails cleanly;
- a save that fails for real (a full tmpfs; checkpoints/ made read-only mid-run) stops the run with
  one line naming the path and the bytes needed / the permission, the previous checkpoint intact
  and resumable;

Readers run in this process through the CLIs' own main() (world 1) on copies of one trained run;
the trainers they must not disturb are real subprocesses.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers_run import (
    checkpoint_tensors,
    checkpoints,
    dir_fingerprint,
    finish,
    kill_tree,
    read_metrics,
    run_train,
    start_train,
    wait_for_step,
)
from torch.distributed.checkpoint import FileSystemReader

from diffmoe_dist.checkpoint import latest_verified, list_checkpoints, verify_checkpoint
from diffmoe_dist.evaluate import main as eval_main
from diffmoe_dist.sample import main as sample_main

FAST_SAMPLE = ["--set", "sample.num_samples=10", "--set", "sample.num_steps=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps, a checkpoint every step, keep 3: step-00000002, -03, -04."""
    d = tmp_path_factory.mktemp("safety") / "run"
    run_train(d, "train.steps=4", "train.ckpt_every=1").check()
    return d


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def flip_ema_expert_bytes(path: Path) -> Path:
    """Flip bytes inside the EMA expert tensors of a checkpoint (same size): the issue's case 3.

    Each item's byte range comes from DCP's own metadata (storage_data: item -> file, offset,
    length); inside it, the tensor's raw float bytes are found and the high byte of every value is
    flipped (sign and exponent), so the file still parses and only the weights are wrong.
    """
    md = FileSystemReader(str(path)).read_metadata()
    hits = [
        info
        for idx, info in md.storage_data.items()
        if idx.fqn.startswith("ema.") and ".experts." in idx.fqn
    ]
    assert hits, "no EMA expert tensors in the checkpoint"
    f = path / hits[0].relative_path
    data = bytearray(f.read_bytes())
    for info in hits:
        region = bytes(data[info.offset : info.offset + info.length])
        raw = torch.load(io.BytesIO(region), weights_only=True).contiguous().numpy().tobytes()
        at = info.offset + region.index(raw)
        for i in range(at + 3, at + len(raw), 4):  # little-endian float32: byte 3 is sign+exponent
            data[i] ^= 0x7F
    size = f.stat().st_size
    f.write_bytes(bytes(data))
    assert f.stat().st_size == size
    return f


def truncate(f: Path) -> Path:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def sample(run: Path, out: Path, *extra: str) -> tuple[int, dict | None]:
    rc = sample_main(["--run-dir", str(run), "--out", str(out), *FAST_SAMPLE, *extra])
    report = out / "sample_report.json"
    return rc, json.loads(report.read_text()) if report.exists() else None


# ----------------------------------------------------------------------------------------------------
# 3. readers verify; 1. readers never write in checkpoints/


def test_sample_skips_flipped_latest_and_writes_nothing(trained: Path, tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path / "run")
    bad = flip_ema_expert_bytes(ckpt(run, 4))
    # a save in progress (as a live trainer would have): a reader must not touch it
    tmp = run / "checkpoints" / ".tmp-step-00000005"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"half written")
    before = dir_fingerprint(run / "checkpoints")
    with pytest.warns(UserWarning, match=str(bad)):
        rc, report = sample(run, tmp_path / "out")
    assert rc == 0 and report is not None
    assert report["checkpoint"] == str(ckpt(run, 3))
    assert dir_fingerprint(run / "checkpoints") == before  # nothing written, deleted or renamed
    assert (tmp_path / "out" / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_skips_truncated_latest(trained: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(trained, tmp_path / "run")
    bad = truncate(ckpt(run, 4) / "__0_0.distcp")
    before = dir_fingerprint(run / "checkpoints")
    with pytest.warns(UserWarning, match=f"{bad}.*truncated"):
        rc = eval_main(["--run-dir", str(run), "--json", *FAST_SAMPLE])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["checkpoint"] == str(ckpt(run, 3))
    assert 0.0 <= result["accuracy"] <= 1.0
    assert dir_fingerprint(run / "checkpoints") == before


def test_no_checkpoint_verifies_is_a_clean_error(trained: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(trained, tmp_path / "run")
    for step in (2, 3, 4):
        truncate(ckpt(run, step) / ".metadata")
    with pytest.warns(UserWarning):
        rc, _ = sample(run, tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2
    assert "no checkpoint under" in err and "verifies" in err
    for step in (2, 3, 4):
        assert f"step-{step:08d}" in err


def test_explicit_damaged_checkpoint_is_refused(trained: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(trained, tmp_path / "run")
    bad = flip_ema_expert_bytes(ckpt(run, 4))
    rc = sample_main(
        ["--checkpoint", str(ckpt(run, 4)), "--out", str(tmp_path / "o"), *FAST_SAMPLE]
    )
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "sha256" in err
    assert not (tmp_path / "o").exists()


def test_flipped_expert_bytes_would_change_the_model(trained: Path, tmp_path: Path) -> None:
    """The damage the readers refuse is real: torch's own converter reads other EMA expert weights."""
    run = copy_run(trained, tmp_path / "run")
    good = checkpoint_tensors(ckpt(run, 4))
    flip_ema_expert_bytes(ckpt(run, 4))
    damaged = checkpoint_tensors(ckpt(run, 4))
    changed = [k for k in good if k.startswith("ema.") and not torch.equal(good[k], damaged[k])]
    assert changed and all(".experts." in k for k in changed)


# ----------------------------------------------------------------------------------------------------
# 4. one trainer per run directory; kill -9 leaves no stale lock


def logged_steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in read_metrics(run)]


def test_second_trainer_refused_then_kill9_and_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = start_train(run, "train.steps=100000", "train.ckpt_every=1")
    try:
        at = wait_for_step(run, 3, first)
        second = run_train(run, "train.steps=100000", "train.ckpt_every=1", timeout_s=120)
        assert second.returncode == 2, second.stderr[-3000:]
        err = second.stderr
        assert "Traceback" not in err, err[-3000:]
        for word in (str(run), f"pid {first.pid}", f"host {socket.gethostname()}", "trainer.lock"):
            assert word in err, f"{word!r} not in: {err[-2000:]}"
        # the first trainer goes on: more steps, and every published checkpoint verifies
        wait_for_step(run, at + 2, first)
        assert first.poll() is None
        # (a checkpoint is unpublished by an atomic rename before deletion: one listed a moment
        # ago may be gone, but one that still exists is complete)
        found = list_checkpoints(run / "checkpoints")
        bad = [c for c in found if verify_checkpoint(c) is not None and c.exists()]
        assert found and not bad, bad
    finally:
        kill_tree(first)  # kill -9 of its whole session, mid-step or mid-save
    assert first.returncode == -9
    resumed_from = latest_verified(run / "checkpoints")
    assert resumed_from is not None
    step = int(resumed_from.name.split("-")[1])
    # no stale lock: the next trainer starts at once and resumes
    res = run_train(run, f"train.steps={step + 2}", "train.ckpt_every=1").check()
    assert f"at step {step}" in res.stdout
    assert logged_steps(run) == list(range(1, step + 3))  # each step once, in order
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the holder cleaned the dead save


# ----------------------------------------------------------------------------------------------------
# 2. non-finite loss: train.nonfinite = stop | skip_step, tested with a learning rate that diverges

DIVERGE = ("train.lr=1e4", "train.steps=20", "train.ckpt_every=1")  # loss 2 -> 3e10 -> 1e18 -> nan


def weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in checkpoint_tensors(ckpt_dir).items()
        if k.startswith(("model.", "ema.", "optim.")) and torch.is_tensor(v)
    }


def assert_all_finite(run: Path) -> None:
    for c in checkpoints(run):
        bad = [k for k, v in weights(c).items() if v.is_floating_point() and not v.isfinite().all()]
        assert not bad, f"{c.name} holds non-finite tensors: {bad[:5]}"


def test_nonfinite_stop_keeps_finite_checkpoints_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = run_train(run, *DIVERGE, "train.keep_checkpoints=2")
    assert res.returncode == 3, res.stderr[-3000:]
    recs = read_metrics(run)
    bad = recs[-1]
    assert bad.get("nonfinite") is True and bad["loss"] == "nan"
    step = int(bad["step"])
    line = [x for x in res.stderr.splitlines() if x.startswith("diffmoe-train: error:")]
    assert len(line) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "non-finite loss nan" in line[0] and f"at step {step}" in line[0]
    assert f"step-{step - 1:08d}" in line[0]  # the last checkpoint, named
    # nothing saved at or after the bad step; the kept ones (keep 2) are the last finite ones
    assert [c.name for c in checkpoints(run)] == [f"step-{step - 2:08d}", f"step-{step - 1:08d}"]
    assert_all_finite(run)
    assert not (run / "final.json").exists()
    # a rerun resumes from the last finite checkpoint and stops again at the same step (finite
    # is not healthy: those weights already diverged); the step is logged once, not twice
    res = run_train(run, *DIVERGE, "train.keep_checkpoints=2")
    assert res.returncode == 3 and f"at step {step - 1}" in res.stdout
    assert logged_steps(run) == list(range(1, step + 1))
    assert [c.name for c in checkpoints(run)] == [f"step-{step - 2:08d}", f"step-{step - 1:08d}"]


def test_nonfinite_skip_step_applies_no_update(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = run_train(run, *DIVERGE, "train.nonfinite=skip_step", "train.nonfinite_max_skips=3")
    assert res.returncode == 3, res.stderr[-3000:]
    recs = read_metrics(run)
    stop = int(recs[-1]["step"])  # the 3rd non-finite step in a row
    assert "3 steps in a row skipped" in res.stderr and f"at step {stop}" in res.stderr
    assert [r["skipped_steps"] for r in recs[stop - 3 : stop - 1]] == [1, 2]
    # the skipped steps saved the weights of the last good step, unchanged (model, EMA, AdamW)
    names = [c.name for c in checkpoints(run)]
    assert names == [f"step-{s:08d}" for s in (stop - 3, stop - 2, stop - 1)]
    first, last = weights(checkpoints(run)[0]), weights(checkpoints(run)[-1])
    assert first.keys() == last.keys()
    assert all(torch.equal(first[k], last[k]) for k in first)
    assert_all_finite(run)


# ----------------------------------------------------------------------------------------------------
# 5. every checkpoint unreadable: refuse, or restart only when asked, pruning nothing superseded


def test_all_checkpoints_unreadable(trained: Path, tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path / "run")
    for step in (2, 3, 4):
        truncate(ckpt(run, step) / "__0_0.distcp")
    before = dir_fingerprint(run)
    res = run_train(run, "train.steps=6", "train.ckpt_every=1")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "train.allow_restart=true" in res.stderr
    for step in (2, 3, 4):
        assert f"step-{step:08d}" in res.stderr
    assert dir_fingerprint(run) == before  # refused before anything was written
    # asked for: starts at step 0; step-2 is replaced by a good one, 3 and 4 are not superseded
    res = run_train(run, "train.steps=2", "train.ckpt_every=1", "train.allow_restart=true").check()
    assert "allow_restart" in res.stderr
    assert [c.name for c in checkpoints(run)] == [f"step-{s:08d}" for s in (1, 2, 3, 4)]
    assert verify_checkpoint(ckpt(run, 2)) is None and verify_checkpoint(ckpt(run, 4)) is not None
    assert logged_steps(run) == [1, 2]  # the old steps 3, 4 are gone from metrics.jsonl


# ----------------------------------------------------------------------------------------------------
# 6. metrics.jsonl: each step once, in order, also when no checkpoint exists


def test_metrics_each_step_once_after_kills_without_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start_train(run, "train.steps=100000", "train.ckpt_every=100000")
    wait_for_step(run, 3, proc)
    kill_tree(proc)
    assert not checkpoints(run) and len(logged_steps(run)) >= 3
    # what older versions left after such restarts: a step twice, and a line cut by the kill
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 1, "loss": 9.0}) + "\n" + '{"step": 2, "lo')
    res = run_train(run, "train.steps=2", "train.ckpt_every=100000").check()
    assert "resumed" not in res.stdout
    assert logged_steps(run) == [1, 2]
    assert read_metrics(run)[0]["loss"] != 9.0  # the rerun's own record


# ----------------------------------------------------------------------------------------------------
# 7. Ctrl-C


def test_ctrl_c_under_torchrun_saves_then_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "PREEMPTED").write_text('{"step": 77}')  # stale, from some earlier preemption
    proc = start_train(run, "train.steps=100000", "train.ckpt_every=1000", nproc=2)
    at = wait_for_step(run, 2, proc, timeout_s=180)
    assert not (run / "PREEMPTED").exists()  # removed when training started
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: agent and both workers
    rc, out, err = finish(proc)
    assert rc != 0  # torchrun's agent reports the signal; the workers saved first
    assert "interrupted (SIGINT): checkpoint at step" in out, err[-3000:]
    stopped = int(re.search(r"checkpoint at step (\d+) written", out).group(1))
    assert stopped >= at and err.count("SIGINT: finishing the step") == 2  # once per worker
    assert "second SIGINT" not in err  # the agent's forwarded SIGINT is the same Ctrl-C
    assert [c.name for c in checkpoints(run)] == [f"step-{stopped:08d}"]  # not a ckpt_every step
    assert verify_checkpoint(checkpoints(run)[0]) is None
    assert not (run / "PREEMPTED").exists()  # Ctrl-C is not a preemption: no requeue marker
    assert logged_steps(run) == list(range(1, stopped + 1))
    # rerun (here on one process): resumes at the saved step, finishes, each step logged once
    res = run_train(run, f"train.steps={stopped + 1}", "train.ckpt_every=1000").check()
    assert f"at step {stopped}" in res.stdout
    assert logged_steps(run) == list(range(1, stopped + 2))
    assert (run / "final.json").exists() and not (run / "PREEMPTED").exists()


def test_second_sigint_exits_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # The first Ctrl-C arrives during start-up (the lock file exists: the trainer is building); it
    # is remembered, and the save would come after step 1, which with this batch takes seconds, so
    # the second Ctrl-C always lands before any save.
    proc = start_train(run, "train.steps=100000", "train.global_batch_size=8192")
    deadline = time.monotonic() + 120
    while not (run / "trainer.lock").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the trainer did not start"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(1.3)  # longer than preemption.SIGINT_DEBOUNCE_S: a second Ctrl-C
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    rc, _, err = finish(proc, timeout_s=60)
    assert "SIGINT: finishing the step" in err, err[-3000:]
    assert rc == 130 and "second SIGINT: exiting now" in err, (rc, err[-3000:])
    assert time.monotonic() - t0 < 5.0
    assert not checkpoints(run) and not list((run / "checkpoints").glob(".tmp-*"))
    assert logged_steps(run) == []  # step 1 was abandoned


# ----------------------------------------------------------------------------------------------------
# 8. disk full / permission during a save: caused for real


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``: writes past it fail with ENOSPC, as on a full disk."""
    path.mkdir()
    res = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` becomes unwritable: a read-only bind mount as root (root ignores modes), else 0o555."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    res = _mount("--bind", "-o", "ro", str(path), str(path))
    if res.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {res.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def error_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.startswith("diffmoe-train: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_disk_full_during_save(tmp_path: Path) -> None:
    # one tiny checkpoint is about 1.7 MB: the first save fits, the second does not
    with small_tmpfs(tmp_path / "disk", "2600k") as disk:
        run = disk / "run"
        res = run_train(run, "train.steps=100", "train.ckpt_every=2")
        assert res.returncode == 4, res.stderr[-3000:]
        line = error_line(res.stderr)
        assert "No space left on device" in line and "step 4 not saved" in line
        assert str(run / "checkpoints" / ".tmp-step-00000004") in line
        need = int(re.search(r"needs about [\d.]+ MB \((\d+) bytes\)", line).group(1))
        first = checkpoints(run)[0]
        assert abs(need - sum(f.stat().st_size for f in first.iterdir())) < 10_000
        assert f"previous checkpoint {first} is intact" in line
        assert [c.name for c in checkpoints(run)] == ["step-00000002"]
        assert verify_checkpoint(first) is None
        assert not list((run / "checkpoints").glob(".tmp-*"))  # the half save freed its space
        # space is freed: the same command resumes from the intact checkpoint
        assert _mount("-o", "remount,size=16m", str(disk)).returncode == 0
        res = run_train(run, "train.steps=5", "train.ckpt_every=2").check()
        assert "at step 2" in res.stdout and logged_steps(run) == [1, 2, 3, 4, 5]


def test_permission_lost_during_save(trained: Path, tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path / "run")
    ckpts = run / "checkpoints"
    before = dir_fingerprint(ckpts)
    proc = start_train(
        run, "train.steps=100000", "train.ckpt_every=10"
    )  # resumes at 4, saves at 10
    try:
        wait_for_step(run, 5, proc)
        with read_only(ckpts):
            rc, out, err = finish(proc)
    finally:
        kill_tree(proc)
    assert rc == 4, err[-3000:]
    line = error_line(err)
    assert "step 10 not saved" in line and str(ckpts / ".tmp-step-00000010") in line
    assert ("Read-only file system" in line or "Permission denied" in line) and (
        f"needs write permission on {ckpts}" in line
    )
    assert f"previous checkpoint {ckpt(run, 4)} is intact" in line
    assert dir_fingerprint(ckpts) == before  # nothing of the failed save is left
    res = run_train(run, "train.steps=6", "train.ckpt_every=10").check()
    assert "at step 4" in res.stdout and logged_steps(run) == list(range(1, 7))


# ----------------------------------------------------------------------------------------------------
# 1. the live-sampling race: sample a run while it writes (and prunes) a checkpoint every step


def test_sampling_a_live_run_never_disturbs_it(tmp_path: Path, capsys) -> None:
    """The trainer is a real process saving every step and keeping 1 checkpoint, so the checkpoint a
    sampler picked is often pruned while it reads it. The samplers run in this process through
    diffmoe-sample's main() (the same code as the console script, minus ~5 s of imports per call),
    on the default output <run>/samples, for about 12 s (at least 5 calls)."""
    run = tmp_path / "run"
    proc = start_train(run, "train.steps=100000", "train.ckpt_every=1", "train.keep_checkpoints=1")
    used, failed = [], []
    try:
        wait_for_step(run, 2, proc, timeout_s=180)
        deadline = time.monotonic() + 12.0
        while time.monotonic() < deadline or len(used) + len(failed) < 5:
            rc = sample_main(["--run-dir", str(run), *FAST_SAMPLE, "--set", "sample.num_steps=1"])
            cap = capsys.readouterr()
            assert "Traceback" not in cap.err, cap.err[-3000:]
            if rc == 0:
                report = json.loads((run / "samples" / "sample_report.json").read_text())
                used.append(int(Path(report["checkpoint"]).name.split("-")[1]))
            else:
                assert rc == 2 and "diffmoe-sample: error:" in cap.err, cap.err[-3000:]
                failed.append(cap.err.strip().splitlines()[-1])
            assert proc.poll() is None, "the trainer died while being sampled"
        progressed = logged_steps(run)[-1]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # preemption: save and exit 0
        rc, out, err = finish(proc)
    assert rc == 0 and "preempted: checkpoint at step" in out, err[-3000:]
    assert len(used) >= 3 and not failed or len(used) > len(failed), (used, failed)
    assert used == sorted(used) and len(set(used)) > 1  # the samplers followed the live run
    assert progressed > used[0] + 5  # the trainer kept stepping (and pruning) meanwhile
    assert [verify_checkpoint(c) for c in checkpoints(run)] == [None]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    steps = logged_steps(run)
    assert steps == list(range(1, steps[-1] + 1))
