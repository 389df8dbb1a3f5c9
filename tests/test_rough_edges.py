"""The rough edges of issue 17 item 3, each reproduced the way a user meets it, each with a clear
error naming the flag, key or file (exit status 2, no traceback) before any work is lost.

The CLIs run as real processes (diffmoe-sample, the tools) or through diffmoe-train's own main();
the latent-shard faults are caused on real shard files (a corrupt byte, a shard with another shape).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_run import REPO, _env, read_metrics, run_train, train_in_process
from safetensors.torch import save_file

from diffmoe_dist.data import LatentShardDataset, read_manifest, write_latent_shards
from diffmoe_dist.fsutil import sha256_file

FAST_SAMPLE = ("sample.num_samples=4", "sample.batch_size=4", "sample.num_steps=2")


def _assert_clear_error(rc: int, stderr: str, *words: str) -> None:
    assert rc == 2, (rc, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    for w in words:
        assert w in stderr, f"{w!r} not in stderr:\n{stderr[-3000:]}"


def _sample(*args: str, timeout_s: float = 240.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "diffmoe_dist.sample", *args]
    for item in FAST_SAMPLE:
        cmd += ["--set", item]
    return subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout_s
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny trained run (2 steps, one checkpoint) that the sampling cases read."""
    d = tmp_path_factory.mktemp("edges") / "run"
    run_train(d, "train.steps=2", "train.ckpt_every=2").check()
    return d


def _checkpoint(run_dir: Path) -> Path:
    (ckpt,) = sorted((run_dir / "checkpoints").glob("step-*"))
    return ckpt


# ---- diffmoe-sample


def test_sample_labels_must_be_integers(run_dir: Path, tmp_path: Path) -> None:
    res = _sample("--run-dir", str(run_dir), "--out", str(tmp_path / "out"), "--labels", "a,b")
    _assert_clear_error(res.returncode, res.stderr, "--labels 'a,b'", "integers")
    assert not (tmp_path / "out").exists()


def test_sample_checkpoint_outside_a_run_needs_out(run_dir: Path, tmp_path: Path) -> None:
    # A checkpoint copied out of its run: "two levels up" would be tmp_path itself.
    ckpt = tmp_path / "exported" / "step-00000002"
    shutil.copytree(_checkpoint(run_dir), ckpt)
    res = _sample("--checkpoint", str(ckpt))
    _assert_clear_error(res.returncode, res.stderr, "not inside a run directory", "--out")
    # tools/threshold_sweep.py has the same default (<run>/sweep): refused before the sweep runs.
    sweep = [sys.executable, "tools/threshold_sweep.py", "--checkpoint", str(ckpt)]
    res = subprocess.run(sweep, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    _assert_clear_error(res.returncode, res.stderr, "<run>/sweep", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-00000002"]
    out = tmp_path / "samples"
    _sample("--checkpoint", str(ckpt), "--out", str(out)).check_returncode()
    assert (out / "grid.png").is_file()
    # Inside a run, the default stays <run>/samples.
    res = _sample("--checkpoint", str(_checkpoint(run_dir)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run_dir / "samples" / "sample_report.json").is_file()


def test_sample_nonfinite_cfg_scale_refused_before_work(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _sample("--run-dir", str(run_dir), "--out", str(out), "--set", "sample.cfg_scale=.inf")
    _assert_clear_error(res.returncode, res.stderr, "sample.cfg_scale", "finite")
    assert not out.exists()  # refused at config validation: no parts/run.json left behind
    # A parts directory whose run stopped before its first part (run.json only, other settings)
    # does not block the next valid run: nothing in it is worth keeping.
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "run.json").write_text(json.dumps({"cfg_scale": 7.0, "num_samples": 99}))
    res = _sample("--run-dir", str(run_dir), "--out", str(out), "--set", "sample.cfg_scale=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "sample_report.json").read_text())["cfg_scale"] == 2.0


# ---- config keys (diffmoe-train's main, in process)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lr=nan", ("train.lr", "finite")),
        ("train.lr=.nan", ("train.lr", "finite")),
        ("sample.cfg_scale=.inf", ("sample.cfg_scale", "finite")),
        ("run.dir=", ("run.dir is empty",)),
        ("data.verify=sometimes", ("data.verify", "auto, always, never")),
    ],
)
def test_train_refuses_bad_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, words: tuple[str, ...]
) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)  # run.dir= used to train into the current directory
    try:
        rc = train_in_process(tmp_path / "run", override)
    finally:
        os.chdir(cwd)
    _assert_clear_error(rc, capsys.readouterr().err, *words)
    assert list(tmp_path.iterdir()) == []


# ---- tools (tools/make_synthetic_latents.py --overwrite: tests/test_synthetic_latents.py::test_bad_input)


def test_gpu_numbers_help_is_not_an_output_dir(tmp_path: Path) -> None:
    script = str(REPO / "tools" / "gpu_numbers.sh")
    res = subprocess.run(["bash", script, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and "OUT_DIR" in res.stdout and "MICRO" in res.stdout, res
    res = subprocess.run(["bash", script, "--out"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown option '--out'" in res.stderr, res
    assert list(tmp_path.iterdir()) == []  # neither became a directory


# ---- latent shards


def _write_set(path: Path, n: int, shard_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(n, 1, 4, 4, generator=g)
    write_latent_shards(path, lat, lat.flip(-1), torch.arange(n) % 10, shard_size, num_classes=10)


def test_shards_get_the_manifest_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _write_set(tmp_path / "a", 6, 4)
        os.umask(0o027)
        _write_set(tmp_path / "b", 6, 4)
    finally:
        os.umask(old)
    for d, mode in ((tmp_path / "a", 0o644), (tmp_path / "b", 0o640)):
        files = sorted(d.iterdir())
        assert [p.name for p in files] == [
            "manifest.json",
            "shard-00000.safetensors",
            "shard-00001.safetensors",
        ]
        assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(mode)}


def test_shard_shape_mismatch_fails_at_startup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "set"
    _write_set(data, 32, 16)
    # Replace shard 1 by one of latent side 2 (not the manifest's 4); fix size and checksum in the
    # manifest so that only the shape disagrees.
    shard = data / "shard-00001.safetensors"
    bad = torch.randn(16, 2, 1, 2, 2)
    save_file({"latents": bad, "labels": torch.zeros(16, dtype=torch.int64)}, str(shard))
    man = read_manifest(data)
    man["shards"][1].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    (data / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(
        ValueError, match=r"shard-00001\.safetensors.*\[16, 2, 1, 2, 2\].*\[16, 2, 1, 4, 4\]"
    ):
        LatentShardDataset(data, verify="never")
    run = tmp_path / "run"
    overrides = (
        "data.name=latents",
        f"data.path={data}",
        "model.in_channels=1",
        "model.input_size=4",
    )
    rc = train_in_process(run, *overrides, "model.patch_size=2", "train.steps=2")
    _assert_clear_error(rc, capsys.readouterr().err, "shard-00001.safetensors", "[16, 2, 1, 2, 2]")
    assert not (run / "metrics.jsonl").exists()  # refused before step 1


def test_corrupt_shard_77_of_100_caught_at_startup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "set"
    _write_set(data, 100, 1)  # 100 shards of one sample
    shard = data / "shard-00076.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01  # one bit of the payload; size and header unchanged
    shard.write_bytes(bytes(raw))
    # data.verify=auto (default): a small set is hashed completely when opened.
    with pytest.raises(
        ValueError, match=r"shard-00076\.safetensors \(shard 77 of 100\) is corrupt"
    ):
        LatentShardDataset(data)
    with pytest.raises(ValueError, match="shard 77 of 100"):
        LatentShardDataset(data, verify="always", auto_max_bytes=0)
    LatentShardDataset(data, verify="never").get_batch(torch.tensor([3]), torch.tensor([False]))
    # The trainer refuses before its first step.
    run = tmp_path / "run"
    overrides = (
        "data.name=latents",
        f"data.path={data}",
        "model.in_channels=1",
        "model.input_size=4",
    )
    rc = train_in_process(run, *overrides, "model.patch_size=2", "train.steps=2")
    _assert_clear_error(rc, capsys.readouterr().err, "shard-00076.safetensors", "corrupt")
    assert not (run / "metrics.jsonl").exists()
    # The tool for large sets (hashes in parallel) finds the same shard; exit 2, then 0 once fixed.
    tool = [sys.executable, "tools/verify_latents.py", str(data), "--jobs", "2"]
    res = subprocess.run(tool, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    _assert_clear_error(res.returncode, res.stderr, "shard-00076.safetensors", "shard 77 of 100")
    raw[-3] ^= 0x01
    shard.write_bytes(bytes(raw))
    res = subprocess.run(tool, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and json.loads(res.stdout)["shards"] == 100, res.stderr
    rc = train_in_process(run, *overrides, "model.patch_size=2", "train.steps=2")
    assert rc == 0 and [r["step"] for r in read_metrics(run)] == [1, 2]
