"""The trainer end to end, run as users run it (diffmoe-train / torchrun subprocesses on configs/tiny.yaml).

References: an uninterrupted single-process run of the same config. Tolerances:
- same process count, resumed vs uninterrupted: exact (same ops in the same order on the same data);
- 1 process vs 2 ranks: ABS_TOL. Gradients are averaged by a SUM all-reduce / world instead of one
  mean over the batch, so float sums are reassociated (~1e-7 relative per op); over 6 AdamW steps at
  lr 1e-3 on losses of about 2 that stays far below 1e-5. A routing difference (a different pool, a
  token picked by another expert) moves the loss by >1e-3, so the tolerance still separates
  "same math" from "different model".
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from dist_utils import run_distributed
from helpers_run import (
    TINY,
    checkpoint_tensors,
    checkpoints,
    dir_fingerprint,
    finish,
    latest_checkpoint,
    losses,
    read_metrics,
    run_train,
    signal_workers,
    start_train,
    train_in_process,
    wait_for_step,
)

from diffmoe_dist.checkpoint import verify_checkpoint
from diffmoe_dist.config import load_config
from diffmoe_dist.train import main as train_main

ABS_TOL = 1e-5
STEPS = 12  # long enough that a signal sent after step 2 lands mid-run even on an idle machine
CURVES = ("loss", "flow_loss", "cp_loss")


class Runs:
    """Memoised runs, so the uninterrupted references are computed once per module."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def get(self, *overrides: str, nproc: int = 1) -> Path:
        """A finished run of tiny.yaml for STEPS steps with ``overrides`` (ckpt every 3 steps)."""
        overrides = (f"train.steps={STEPS}", *overrides)
        key = (nproc, overrides)
        if key not in self.done:
            d = self.root / f"run{len(self.done)}-n{nproc}"
            run_train(d, *overrides, nproc=nproc).check()
            self.done[key] = d
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("trainer-runs"))


def assert_curves_close(got: Path, want: Path, tol: float) -> None:
    for key in CURVES:
        a, b = losses(got, key), losses(want, key)
        assert sorted(a) == sorted(b), f"{key}: logged steps differ: {sorted(a)} vs {sorted(b)}"
        worst = max(abs(a[s] - b[s]) for s in b)
        assert worst <= tol, f"{key}: max |diff| {worst:.3g} > {tol} ({a} vs {b})"


def assert_final_state_equal(got: Path, want: Path) -> None:
    a, b = checkpoint_tensors(latest_checkpoint(got)), checkpoint_tensors(latest_checkpoint(want))
    keys = {k for k in b if k.startswith(("model.", "ema.", "optim."))}
    assert keys == {k for k in a if k.startswith(("model.", "ema.", "optim."))}
    assert any(".thresholds" in k for k in keys) and any(k.startswith("ema.") for k in keys)
    diff = [k for k in sorted(keys) if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"


# ----------------------------------------------------------------------------------------------------
# resume and preemption


def test_resume_matches_uninterrupted_run(runs: Runs, tmp_path: Path) -> None:
    ref = runs.get()  # STEPS steps straight
    d = tmp_path / "resumed"
    run_train(d, "train.steps=5").check()  # checkpoints at 3 (ckpt_every) and 5 (end)
    assert [c.name for c in checkpoints(d)] == ["step-00000003", "step-00000005"]
    assert sorted(losses(d)) == [1, 2, 3, 4, 5]
    res = run_train(d, f"train.steps={STEPS}").check()
    assert "resumed from" in res.stdout and "at step 5" in res.stdout
    for key in CURVES:  # every step's loss, exactly
        assert losses(d, key) == losses(ref, key), key
    assert_final_state_equal(d, ref)


@pytest.mark.parametrize("nproc", [1, 2])
def test_preemption_checkpoint_and_resume(runs: Runs, tmp_path: Path, nproc: int) -> None:
    ref = runs.get()
    d = tmp_path / "preempted"
    proc = start_train(d, f"train.steps={STEPS}", nproc=nproc)
    wait_for_step(d, 2, proc)
    signal_workers(proc, signal.SIGUSR1, nproc)  # the workers, as SLURM's --signal does
    rc, out, err = finish(proc)
    assert rc == 0, err[-3000:]
    marker = d / "PREEMPTED"
    assert marker.exists(), f"no PREEMPTED marker; stdout:\n{out[-2000:]}"
    stopped = json.loads(marker.read_text())["step"]
    assert 2 <= stopped < STEPS, f"stopped at {stopped}: the signal did not stop the run mid-way"
    assert not (d / "final.json").exists()
    # the newest checkpoint is the one written for the preemption, and it is complete
    assert latest_checkpoint(d).name == f"step-{stopped:08d}"
    assert verify_checkpoint(latest_checkpoint(d)) is None
    first_part = losses(d)
    assert sorted(first_part) == list(range(1, stopped + 1))
    res = run_train(d, f"train.steps={STEPS}", nproc=nproc).check()
    assert f"at step {stopped}" in res.stdout
    whole = losses(d)
    assert {s: whole[s] for s in first_part} == first_part  # the first part was kept, not redone
    # the concatenated curve is the uninterrupted one (exact on 1 process, ABS_TOL on 2 ranks)
    assert_curves_close(d, ref, 0.0 if nproc == 1 else ABS_TOL)
    if nproc == 1:
        assert_final_state_equal(d, ref)


# ----------------------------------------------------------------------------------------------------
# the math does not depend on the number of ranks


MODES = ("dense", "tc", "ec", "diffmoe")


def _two_rank_worker(rank: int, world_size: int, root: str) -> dict:
    """Runs on 2 spawned gloo ranks (tests/dist_utils.py): every routing mode at world 2, then the
    batch-15 start-up check through the CLI's main(), then (rank 0 alone) every mode at world 1.

    One spawn instead of 8 torchrun/python launches keeps this under the suite's time budget; the
    real torchrun path is exercised by the preemption and expert-parallel tests below.
    """
    import contextlib
    import io
    import os

    from diffmoe_dist.parallel.distributed import DistInfo
    from diffmoe_dist.trainer.trainer import Trainer

    def run(mode: str, world: int) -> dict[str, dict[int, float]]:
        d = Path(root) / f"{mode}-w{world}"
        cfg = load_config(
            TINY, [f"run.dir={d}", "run.progress=false", f"train.steps={STEPS}", f"moe.mode={mode}"]
        )
        info = DistInfo(
            rank if world > 1 else 0, world, 0, torch.device("cpu"), "gloo" if world > 1 else ""
        )
        Trainer(cfg, info).train()
        return {k: losses(d, k) for k in (*CURVES, "balance_loss")} if rank == 0 else {}

    out: dict = {"w2": {m: run(m, 2) for m in MODES}}
    # the CLI under 2 ranks with a global batch of 15: RANK etc. as torchrun would export them
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="1",
    )
    err = io.StringIO()
    argv = [
        "--config",
        str(TINY),
        "--set",
        f"run.dir={root}/bad",
        "--set",
        "train.global_batch_size=15",
    ]
    with contextlib.redirect_stderr(err):
        out["bad_rc"] = train_main(argv)  # main() also tears the process group down
    out["bad_err"] = err.getvalue()
    if rank == 0:
        out["w1"] = {m: run(m, 1) for m in MODES}
    return out


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("two-rank")
    return run_distributed(_two_rank_worker, 2, args=(str(root),), timeout_s=400)


@pytest.mark.parametrize("mode", MODES)
def test_one_process_equals_two_ranks(two_rank: list[dict], mode: str) -> None:
    one, two = two_rank[0]["w1"][mode], two_rank[0]["w2"][mode]
    for key in (*CURVES, "balance_loss"):
        assert sorted(one[key]) == sorted(two[key]) == list(range(1, STEPS + 1)), key
        worst = max(abs(one[key][s] - two[key][s]) for s in one[key])
        assert worst <= ABS_TOL, f"{mode} {key}: max |diff| {worst:.3g} > {ABS_TOL}"
    if mode == "tc":  # the Switch balance loss is live, so its statistics were compared too
        assert min(one["balance_loss"].values()) > 0


@pytest.mark.parametrize(
    "pool_samples",
    [
        4,
        16,
    ],  # micro-batch is 16 / 2 = 8: 4 -> two pools inside each rank; 16 -> one pool over both ranks
    ids=["pools-within-rank", "pool-spans-ranks"],
)
def test_expert_parallel_two_ranks_equals_one_process(runs: Runs, pool_samples: int) -> None:
    pool_set = () if pool_samples == 4 else (f"moe.pool_samples={pool_samples}",)  # 4: tiny.yaml's
    one = runs.get(*pool_set)
    two = runs.get(*pool_set, "parallel.ep=2", nproc=2)
    assert {(r["world_size"], r["ep"]) for r in read_metrics(two)} == {(2, 2)}
    assert_curves_close(two, one, ABS_TOL)
    # tokens really crossed ranks (not a silently local dispatch)
    assert all(sum(r["a2a_bytes"]["total"].values()) > 0 for r in read_metrics(two))


# ----------------------------------------------------------------------------------------------------
# what a run writes


def test_metrics_and_resolved_config(runs: Runs) -> None:
    d = runs.get()
    recs = read_metrics(d)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))  # tiny.yaml: log_every 1
    for r in recs:
        for key in ("step", "loss", "flow_loss", "cp_loss", "lr", "grad_norm", "samples_per_s"):
            assert key in r, key
            assert isinstance(r[key], (int, float)) and r[key] == r[key], (key, r[key])  # no NaN
        assert r["loss"] == pytest.approx(r["flow_loss"] + r["cp_loss"] + r["balance_loss"])
        assert r["lr"] == pytest.approx(1e-3) and r["grad_norm"] > 0 and r["samples_per_s"] > 0
    # config.yaml is the resolved config: plain YAML, loadable, equal to base + overrides
    written = d / "config.yaml"
    assert isinstance(yaml.safe_load(written.read_text()), dict)
    expected = load_config(TINY, [f"run.dir={d}", "run.progress=false", f"train.steps={STEPS}"])
    assert load_config(written).to_dict() == expected.to_dict()
    final = json.loads((d / "final.json").read_text())
    assert final["step"] == STEPS and final["loss"] == pytest.approx(recs[-1]["loss"])


# ----------------------------------------------------------------------------------------------------
# bad input: exit code 2, the key named on stderr, nothing lost. One case runs the real executable
# (sys.exit(main()) wiring); the others call the same main() in-process, which is what sets the code.


def _assert_clear_error(rc: int, stderr: str, *words: str) -> None:
    assert rc == 2, (rc, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    for w in words:
        assert w in stderr, f"{w!r} not in stderr:\n{stderr[-3000:]}"


def _main(capsys: pytest.CaptureFixture[str], run_dir: Path, *overrides: str, config=TINY):
    rc = train_in_process(run_dir, *overrides, config=config)
    return rc, capsys.readouterr()


def test_missing_config_file(tmp_path: Path) -> None:
    res = run_train(tmp_path / "run", config=tmp_path / "nope.yaml")
    _assert_clear_error(res.returncode, res.stderr, "nope.yaml", "does not exist")


def test_malformed_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: [2\n  hidden_size: 32\n")
    rc, cap = _main(capsys, tmp_path / "run", config=bad)
    _assert_clear_error(rc, cap.err, "bad.yaml", "YAML")


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.hiden_size=32", "hiden_size"),  # unknown key
        ("moe.num_experts=0", "moe.num_experts"),
        ("moe.capacity=0", "moe.capacity"),
        ("moe.capacity=-0.5", "moe.capacity"),
    ],
)
def test_bad_config_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, key: str
) -> None:
    d = tmp_path / "run"
    rc, cap = _main(capsys, d, override)
    _assert_clear_error(rc, cap.err, key)
    assert not (d / "checkpoints").exists()


def test_batch_not_divisible_by_world_size(two_rank: list[dict]) -> None:
    for r in two_rank:  # every rank refuses, before any step: exit code 2, the key and numbers
        _assert_clear_error(r["bad_rc"], r["bad_err"], "train.global_batch_size=15", "world size 2")


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.hidden_size=64", ("hidden_size", "another model")),
        ("moe.pool_samples=8", ("moe.pool_samples", "allow_pool_change")),
    ],
    ids=["hidden_size", "pool_samples"],
)
def test_resume_refuses_incompatible_checkpoint(
    runs: Runs,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    override: str,
    words: tuple[str, ...],
) -> None:
    d = tmp_path / "run"
    shutil.copytree(runs.get(), d)
    before = dir_fingerprint(d)
    rc, cap = _main(capsys, d, f"train.steps={STEPS + 2}", override)
    _assert_clear_error(rc, cap.err, *words)
    assert dir_fingerprint(d) == before, "a refused resume modified the run directory"


def test_pool_change_allowed_when_asked(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "run"
    shutil.copytree(runs.get(), d)
    ref = losses(d)
    rc, cap = _main(
        capsys, d, f"train.steps={STEPS + 1}", "moe.pool_samples=8", "train.allow_pool_change=true"
    )
    assert rc == 0, cap.err[-3000:]
    assert f"at step {STEPS}" in cap.out
    got = losses(d)
    assert {s: got[s] for s in ref} == ref and sorted(got) == list(range(1, STEPS + 2))
