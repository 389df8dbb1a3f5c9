"""tools/threshold_sweep.py on a tiny digits run trained in the test: one row per setting (learned
thresholds, each gamma, static), C_infer falling as gamma rises, the digits judge's numbers, a
Markdown table and a PNG; a model without the predictor is refused."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_run import REPO, _env, run_train

TOOL = REPO / "tools" / "threshold_sweep.py"
FAST = ["--set", "sample.num_samples=10", "--set", "sample.num_steps=4"]


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args, *FAST],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sweep") / "run"
    run_train(d, "train.steps=4").check()
    return d


def test_sweep_table_and_plot(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    res = _sweep("--run-dir", str(run_dir), "--gammas", "0.2,0.5,0.8", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["setting"] for r in rows] == [
        "dynamic (learned)",
        "gamma=0.2",
        "gamma=0.5",
        "gamma=0.8",
        "static (C=1)",
    ]
    assert rows[-1]["c_infer"] == pytest.approx(1.0)  # static top-k: exactly C
    c = [r["c_infer"] for r in rows[1:4]]
    assert c[0] >= c[1] >= c[2] and c[0] > c[2], c  # a higher threshold processes fewer pairs
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["fd"] >= 0 and len(r["c_infer_per_layer"]) == 1
    table = (out / "sweep.md").read_text()
    assert "| threshold | C_infer | digits FD | digits acc. |" in table
    assert "| gamma=0.5 |" in table and table in res.stdout
    assert "Versions: python" in table and "git commit" in table
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def _tool_main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("threshold_sweep", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([*argv, *FAST])


def test_sweep_refuses_bad_input(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process: every refusal happens before any process group or sampling work.
    assert _tool_main(["--run-dir", str(run_dir), "--gammas", "0.5,1.5"]) == 2
    assert "thresholds are probabilities in (0, 1), got [1.5]" in capsys.readouterr().err
    dense = tmp_path / "dense"
    run_train(dense, "train.steps=1", "moe.mode=dense").check()
    assert _tool_main(["--run-dir", str(dense)]) == 2
    assert "needs moe.mode=diffmoe" in capsys.readouterr().err
    assert _tool_main(["--run-dir", str(run_dir), "--ref", str(tmp_path / "r.npz")]) == 2
    assert "digits runs are scored by the digits judge" in capsys.readouterr().err
