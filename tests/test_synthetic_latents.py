"""tools/make_synthetic_latents.py (diffmoe_dist/data/synthetic.py): real shards a trainer reads,
deterministic, clear errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers_run import TINY, read_metrics, train_in_process  # noqa: E402

from diffmoe_dist.data import LatentShardDataset  # noqa: E402
from diffmoe_dist.data.synthetic import main as make_main  # noqa: E402


def test_shards_follow_the_config_and_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--config", str(TINY), "--count", "40", "--shard-size", "16", "--seed", "3"]
    assert make_main([*args, "--out", str(a)]) == 0
    assert make_main([*args, "--out", str(b)]) == 0
    ds = LatentShardDataset(a)
    assert len(ds) == 40 and (ds.channels, ds.image_size, ds.num_classes) == (1, 16, 10)
    idx = torch.arange(40)
    x, y = ds.get_batch(idx, torch.zeros(40, dtype=torch.bool))
    xf, yf = ds.get_batch(idx, torch.ones(40, dtype=torch.bool))
    assert x.shape == (40, 1, 16, 16) and torch.equal(xf, x.flip(-1)) and torch.equal(yf, y)
    assert 0.8 < float(x.std()) < 1.2 and int(y.min()) >= 0 and int(y.max()) < 10
    x2, y2 = LatentShardDataset(b).get_batch(idx, torch.zeros(40, dtype=torch.bool))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # same seed, same data
    # the trainer takes them as a latent dataset
    run = tmp_path / "run"
    rc = train_in_process(run, "train.steps=2", "data.name=latents", f"data.path={a}")
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    assert make_main(["--out", str(out), "--count", "0"]) == 2
    assert "--count=0" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    assert make_main(["--out", str(out), "--count", "4", "--size", "4"]) == 0
    assert make_main(["--out", str(out), "--count", "4", "--size", "4"]) == 2  # exists already
    err = capsys.readouterr().err  # names the flag, not the library's overwrite=True
    assert "already holds a dataset" in err and "pass --overwrite" in err, err
    assert make_main(["--out", str(out), "--count", "4", "--size", "4", "--overwrite"]) == 0
    assert make_main(["--out", str(out), "--count", "4", "--config", "nope.yaml"]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_tool_shell_runs_the_package_command(tmp_path: Path) -> None:
    """tools/make_synthetic_latents.py is a shell over data/synthetic.py: same data, same seed."""
    import json
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    args = ["--count", "5", "--size", "4", "--channels", "2", "--num-classes", "3", "--seed", "1"]
    tool = [sys.executable, str(repo / "tools" / "make_synthetic_latents.py"), *args]
    res = subprocess.run(
        [*tool, "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["shape"] == [2, 4, 4]
    assert make_main([*args, "--out", str(tmp_path / "b")]) == 0
    idx, flip = torch.arange(5), torch.zeros(5, dtype=torch.bool)
    xa, ya = LatentShardDataset(tmp_path / "a").get_batch(idx, flip)
    xb, yb = LatentShardDataset(tmp_path / "b").get_batch(idx, flip)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
