"""One checkpoint format for both engines, end to end with real processes (issue 13).

Two reference runs of the same tiny config (configs/tiny.yaml, 2 ranks under torchrun, ep 2, gloo,
STEPS steps, a checkpoint every 2): the native engine and DeepSpeed ZeRO 2. From them:

- the DeepSpeed run's checkpoints are the project's (checkpoints/step-*, manifest), so
  ``diffmoe-sample --run-dir``, ``diffmoe-eval`` and ``tools/threshold_sweep.py`` read it, and its
  samples equal the native run's (uint8 images from weights that agree to about 1e-6);
- its step-2 checkpoint resumes at world 4 / ep 4 (torchrun) and at world 1 (plain python, no
  torchrun), each continuing the uninterrupted DeepSpeed curve to RTOL;
- native -> DeepSpeed and DeepSpeed -> native resumes continue the uninterrupted curve of the run
  they came from; the loss at step 4 is computed after the first update made with the loaded Adam
  moments (zero moments would change it by far more than RTOL), and the optimizer state written at
  step 4 equals the uninterrupted run's;
- an old-format ``ds_checkpoints/`` directory is refused with the conversion command, before any
  group work; ``diffmoe-convert-ds`` converts it.

RTOL = the engines' parity tolerance (tests/test_deepspeed.py): the same fp32 math, reductions in
another order.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_run import (
    REPO,
    _env,
    checkpoint_tensors,
    checkpoints,
    losses,
    run_train,
    train_in_process,
)

STEPS = 4
RTOL = 1e-4
BASE = (f"train.steps={STEPS}", "train.ckpt_every=2", "parallel.ep=2", "parallel.backend=gloo")
DS = ("engine=deepspeed", "deepspeed.zero_stage=2")
SAMPLE = ("--set", "sample.num_samples=10", "--set", "sample.num_steps=4", "--set", "parallel.ep=1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    out = {"native": root / "native", "ds": root / "ds"}
    run_train(out["native"], *BASE, nproc=2, timeout_s=300).check()
    run_train(out["ds"], *BASE, *DS, nproc=2, timeout_s=300).check()
    return out


def _resume_dir(src: Path, dst: Path) -> Path:
    """A copy of ``src`` stopped at step 2: later checkpoints removed (metrics are truncated on resume)."""
    shutil.copytree(src, dst)
    for ck in checkpoints(dst):
        if ck.name != "step-00000002":
            shutil.rmtree(ck)
    return dst


def _close(got: dict[int, float], ref: dict[int, float], steps: range) -> None:
    for s in steps:
        assert got[s] == pytest.approx(ref[s], rel=RTOL), (s, got[s], ref[s])


def test_deepspeed_run_writes_the_project_checkpoint(runs: dict[str, Path]) -> None:
    ds = runs["ds"]
    assert [c.name for c in checkpoints(ds)] == ["step-00000002", "step-00000004"]
    assert not (ds / "ds_checkpoints").exists()
    meta = json.loads((checkpoints(ds)[-1] / "manifest.json").read_text())["meta"]
    assert meta["config"]["engine"] == "deepspeed" and meta["layout"] == {"world_size": 2, "ep": 2}
    # experts under their global index, Adam state per parameter, as the native engine writes it
    keys_ds = set(checkpoint_tensors(checkpoints(ds)[-1]))
    keys_native = set(checkpoint_tensors(checkpoints(runs["native"])[-1]))
    assert {k for k in keys_ds if not k.startswith("rng.")} == {
        k for k in keys_native if not k.startswith("rng.")
    }
    assert "optim.blocks.1.ffn.experts.w1.exp_avg.e0003" in keys_ds
    # the engines' parity: the same curve
    _close(losses(ds), losses(runs["native"]), range(1, STEPS + 1))


def test_sample_eval_and_sweep_read_a_deepspeed_run(runs: dict[str, Path], tmp_path: Path) -> None:
    from diffmoe_dist.sample import main as sample_main

    images = {}
    for name in ("native", "ds"):
        out = tmp_path / f"samples-{name}"
        assert sample_main(["--run-dir", str(runs[name]), "--out", str(out), "--npz", *SAMPLE]) == 0
        images[name] = np.load(out / "samples.npz")["arr_0"].astype(np.int16)
    diff = np.abs(images["ds"] - images["native"])
    # weights agree to ~1e-6: a pixel may round to the neighbouring uint8 level, no more
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())

    ev = subprocess.run(
        [sys.executable, "-m", "diffmoe_dist.evaluate", "--run-dir", str(runs["ds"]), "--json"]
        + list(SAMPLE),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["checkpoint"].endswith("step-00000004") and 0 <= result["accuracy"] <= 1

    sweep_out = tmp_path / "sweep"
    sw = subprocess.run(
        [sys.executable, str(REPO / "tools" / "threshold_sweep.py"), "--run-dir", str(runs["ds"])]
        + ["--gammas", "0.5", "--out", str(sweep_out), *SAMPLE],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert sw.returncode == 0, sw.stderr[-3000:]
    rows = json.loads((sweep_out / "sweep.json").read_text())
    assert [r["setting"] for r in rows][:2] == ["dynamic (learned)", "gamma=0.5"]


def test_deepspeed_resumes_at_world_4_and_at_world_1(runs: dict[str, Path], tmp_path: Path) -> None:
    ref = losses(runs["ds"])
    d4 = _resume_dir(runs["ds"], tmp_path / "w4")
    r4 = run_train(d4, *BASE, *DS, "parallel.ep=4", nproc=4, timeout_s=300).check()
    assert "resumed from" in r4.stdout and "world 2, ep 2; now world 4, ep 4" in r4.stdout
    _close(losses(d4), ref, range(1, STEPS + 1))
    d1 = _resume_dir(runs["ds"], tmp_path / "w1")
    r1 = run_train(d1, *BASE, *DS, "parallel.ep=1", nproc=1, timeout_s=300).check()  # no torchrun
    assert "now world 1, ep 1" in r1.stdout
    _close(losses(d1), ref, range(1, STEPS + 1))


@pytest.mark.parametrize(("src", "engine"), [("native", DS), ("ds", ("engine=native",))])
def test_engine_switch_resumes_with_the_optimizer_state(
    runs: dict[str, Path], tmp_path: Path, src: str, engine: tuple[str, ...]
) -> None:
    d = _resume_dir(runs[src], tmp_path / "switched")
    r = run_train(d, *BASE, *engine, nproc=2, timeout_s=300).check()
    assert "engine switch" in r.stdout and "resumed from" in r.stdout
    _close(losses(d), losses(runs[src]), range(1, STEPS + 1))
    got = checkpoint_tensors(checkpoints(d)[-1])
    want = checkpoint_tensors(checkpoints(runs[src])[-1])
    for k in (k for k in want if k.startswith(("optim.", "model.", "ema."))):
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-3, atol=1e-6, msg=k)


def test_old_deepspeed_directory_is_refused_with_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "old"
    (run / "ds_checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "ds_checkpoints" / "latest").write_text("step-00000002")
    assert train_in_process(run, *DS, "parallel.ep=1") == 2
    err = capsys.readouterr().err
    assert f"python -m diffmoe_dist.trainer.convert_ds {run}" in err, err
    assert "latest step-00000002" in err
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_convert_old_deepspeed_directory(tmp_path: Path) -> None:
    """The old format as the previous DeepSpeedTrainer wrote it at world 2 / ep 2 (one
    diffmoe_rankNNNNN.pt per rank: that rank's expert slice, EMA, RNG, step) -> the project's
    checkpoint with every expert under its global index; training then resumes from it."""
    from diffmoe_dist.config import load_config, save_config
    from diffmoe_dist.models.dit import DiffMoE
    from diffmoe_dist.trainer.convert_ds import main as convert_main

    run = tmp_path / "old"
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [f"run.dir={run}", "parallel.ep=2"])
    torch.manual_seed(1)
    model, ema = DiffMoE(cfg.model, cfg.moe), DiffMoE(cfg.model, cfg.moe)
    tag = run / "ds_checkpoints" / "step-00000002"
    tag.mkdir(parents=True)
    (run / "ds_checkpoints" / "latest").write_text("step-00000002")
    save_config(cfg, run / "config.yaml")
    for rank in range(2):

        def local(sd: dict, rank: int = rank) -> dict:
            return {
                k: (v[2 * rank : 2 * rank + 2] if ".experts." in k else v) for k, v in sd.items()
            }

        torch.save(
            {
                "step": 2,
                "model": local(model.state_dict()),
                "ema": local(ema.state_dict()),
                "rng": torch.get_rng_state(),
            },
            tag / f"diffmoe_rank{rank:05d}.pt",
        )
    assert convert_main([str(run)]) == 0
    assert (run / "ds_checkpoints.converted").is_dir() and not (run / "ds_checkpoints").exists()
    state = checkpoint_tensors(run / "checkpoints" / "step-00000002")
    w1 = model.state_dict()["blocks.1.ffn.experts.w1"]
    for e in range(4):
        assert torch.equal(state[f"model.blocks.1.ffn.experts.w1.e{e:04d}"], w1[e])
    thr = ema.state_dict()["blocks.1.ffn.thresholds"]
    assert torch.equal(state["ema.blocks.1.ffn.thresholds"], thr)
    assert train_in_process(run, "train.steps=3", "parallel.ep=1") == 0
    assert sorted(losses(run)) == [3]
