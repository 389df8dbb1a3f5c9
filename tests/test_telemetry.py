"""Expert telemetry: hand examples, 2 ranks == 1 process (training and sampling), the plot tool.

Integer counters (tokens, pairs, predictor hits) are summed over ranks in float64, so the 2-rank
numbers must equal the single-process ones exactly, not approximately.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_run import REPO, _env, read_metrics, run_train

from diffmoe_dist.models.moe import MoEStats
from diffmoe_dist.telemetry import (
    ExpertTelemetry,
    load_skew,
    peak_mem_mb,
    peak_rss_mb,
    precision_recall,
    t_bucket,
)

TELEMETRY_KEYS = (
    "tokens_per_expert",
    "capacity_per_layer",
    "pred_precision_per_layer",
    "pred_recall_per_layer",
    "compute_by_t_bucket",
    "compute_by_class",
    "t_bucket_tokens",
    "class_tokens",
    "expert_load_skew_per_layer",
)


def test_t_bucket_by_hand() -> None:
    # float64 so the edges are the decimal ones (float32 0.9 is 0.89999998 -> bucket 8)
    t = torch.tensor([0.0, 0.05, 0.1, 0.15, 0.55, 0.899, 0.9, 0.999, 1.0], dtype=torch.float64)
    assert t_bucket(t).tolist() == [0, 0, 1, 1, 5, 8, 9, 9, 9]
    assert t_bucket(torch.tensor([0.49, 0.5]), num_buckets=2).tolist() == [0, 1]


def test_precision_recall_by_hand() -> None:
    # 3 tokens x 2 experts. route: (0,0) (1,1) (2,0); pred: (0,0) (0,1) (1,1) (2,1)
    route = torch.tensor([[1, 0], [0, 1], [1, 0]], dtype=torch.bool)
    pred = torch.tensor([[1, 1], [0, 1], [0, 1]], dtype=torch.bool)
    p, r = precision_recall(pred, route)
    assert p == pytest.approx(2 / 4) and r == pytest.approx(2 / 3)
    assert precision_recall(torch.zeros_like(pred), route) == (None, 0.0)
    assert load_skew([2, 2, 8]) == pytest.approx(2.0) and load_skew([0, 0]) is None


def _stats(route: list[list[int]], pred: list[list[int]] | None = None) -> MoEStats:
    r = torch.tensor(route, dtype=torch.bool)
    s = MoEStats(tokens=r.shape[0], pairs=int(r.sum()), num_experts=r.shape[1])
    s.route_mask, s.token_pairs, s.expert_counts = r, r.sum(1), r.sum(0)
    s.pred_mask = torch.tensor(pred, dtype=torch.bool) if pred is not None else None
    return s


def test_accumulation_by_hand() -> None:
    """2 samples x 2 tokens, 2 experts; sample 0 (t 0.05, class 3) gets 3 pairs, sample 1
    (t 0.95, null label) gets 1."""
    tele = ExpertTelemetry(num_classes=5)
    route = [[1, 1], [1, 0], [0, 0], [0, 1]]
    pred = [[1, 0], [1, 1], [0, 0], [0, 0]]
    tele.add([_stats(route, pred)], torch.tensor([0.05, 0.95]), torch.tensor([3, 5]))
    tele.reduce(None)
    s = tele.summary()
    assert s["tokens_per_expert"] == [[2, 2]]
    assert s["capacity_per_layer"] == [1.0]  # 4 pairs / 4 tokens
    bt = s["compute_by_t_bucket"][0]
    assert bt[0] == 1.5 and bt[9] == 0.5 and all(v is None for v in bt[1:9])
    assert s["compute_by_class"][0] == [None, None, None, 1.5, None, 0.5]
    assert s["t_bucket_tokens"] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    # predictor: 3 predicted, 4 routed, 2 hits
    assert s["pred_precision_per_layer"] == [pytest.approx(2 / 3)]
    assert s["pred_recall_per_layer"] == [0.5]
    assert s["peak_mem_mb"] > 0


def test_padding_and_cfg_batch() -> None:
    """valid [B] drops padding samples; a CFG batch [2B] tiles it."""
    tele = ExpertTelemetry(num_classes=2)
    route = [[1, 0], [1, 0], [0, 1], [0, 1]]  # 4 samples x 1 token
    t = torch.tensor([0.2, 0.7, 0.2, 0.7])
    tele.add([_stats(route)], t, torch.tensor([0, 1, 2, 2]), valid=torch.tensor([True, False]))
    s = tele.summary()
    assert s["t_bucket_tokens"][2] == 2 and s["t_bucket_tokens"][7] == 0
    assert s["tokens_per_expert"] == [[1, 1]]
    assert s["pred_precision_per_layer"] == [None]
    # a label out of range is refused before any counter changes (checked without a host read)
    for bad in ([0, 1, 2, 3], [0, 1, 2, -1]):
        with pytest.raises(ValueError, match="labels outside"):
            tele.add([_stats(route)], t, torch.tensor(bad))
    assert tele.summary() == s


# ----------------------------------------------------------------------------------------------------
# end to end: training and sampling, 1 process vs 2 ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("telemetry")
    one, two = root / "one", root / "two"
    run_train(one, "train.steps=3").check()
    run_train(two, "train.steps=3", "parallel.ep=2", nproc=2).check()
    return {"one": one, "two": two}


def test_training_telemetry_two_ranks_equals_one(runs: dict[str, Path]) -> None:
    one, two = read_metrics(runs["one"]), read_metrics(runs["two"])
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in TELEMETRY_KEYS:
            assert a[key] == b[key], f"step {a['step']} {key}: {a[key]} vs {b[key]}"
        assert sum(b["t_bucket_tokens"]) == 16 * 16  # global batch x tokens per image
        assert b["pred_precision"] is not None and 0 <= b["pred_recall"] <= 1
        assert len(b["peak_mem_mb_per_rank"]) == 2 and b["peak_mem_mb"] > 0
        assert b["a2a_time_s"] > 0 and 0 < b["a2a_share"] < 1  # ep=2 moves tokens
        assert a["a2a_share"] == 0.0
        # thresholds are float state (an EMA of all-reduced statistics): equal to rounding
        ta, tb = (sum(r["thresholds"], []) for r in (a, b))
        assert tb == pytest.approx(ta, rel=1e-6) and b["pool_samples"] == 4
        assert b["a2a_bytes"]["total"] and "a2a_bytes" not in a  # ep=1: nothing moved


def _one_all_reduce(rank: int, world_size: int, run_dir: str) -> int:
    from helpers_run import TINY

    from diffmoe_dist.config import load_config
    from diffmoe_dist.parallel.distributed import DistInfo
    from diffmoe_dist.trainer.trainer import Trainer

    cfg = load_config(str(TINY), [f"run.dir={run_dir}", "parallel.ep=2", "parallel.backend=gloo"])
    tr = Trainer(cfg, DistInfo(rank, world_size, 0, torch.device("cpu"), "gloo"))
    tr.train_step()
    tr.train_step()
    calls = []
    real = torch.distributed.all_reduce

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    torch.distributed.all_reduce = counting
    try:
        rec = tr.moe_metrics()
    finally:
        torch.distributed.all_reduce = real
    assert sum(map(sum, rec["tokens_per_expert"])) == 2 * 16 * 16  # two steps since the last log
    return len(calls)


def test_moe_statistics_cost_one_all_reduce_per_log_step(tmp_path: Path) -> None:
    """telemetry.py is the one home: the trainer's MoE record of a log step (counters, capacity,
    thresholds, bytes) is one all-reduce, and counts cover every step since the previous log."""
    import os

    sys.path.insert(0, os.path.dirname(__file__))
    from dist_utils import run_distributed

    assert run_distributed(_one_all_reduce, 2, args=(str(tmp_path / "r"),), timeout_s=200) == [1, 1]


def _sample(run_dir: Path, out: Path, nproc: int) -> dict:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = launcher + ["-m", "diffmoe_dist.sample", "--run-dir", str(run_dir), "--out", str(out)]
    # 5 samples on 2 ranks: rank 1 pads one; the batch-independent rule makes samples layout-free
    for s in ("sample.num_samples=5", "sample.cfg_scale=2", "moe.infer_mode=independent"):
        cmd += ["--set", s]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "sample_report.json").read_text())


def test_sampling_telemetry_two_ranks_equals_one(runs: dict[str, Path], tmp_path: Path) -> None:
    rep1 = _sample(runs["one"], tmp_path / "s1", 1)
    rep2 = _sample(runs["one"], tmp_path / "s2", 2)
    # C_infer comes from the same counters (padding excluded), so it is layout-free too
    assert rep1["c_infer_per_layer"] == rep2["c_infer_per_layer"]
    one, two = rep1["telemetry"], rep2["telemetry"]
    for key in TELEMETRY_KEYS:
        assert one[key] == two[key], f"{key}: {one[key]} vs {two[key]}"
    # 8 Euler steps x 5 samples x 2 (CFG) x 16 tokens, padding excluded
    assert sum(one["t_bucket_tokens"]) == 8 * 5 * 2 * 16
    assert one["class_tokens"][-1] == 8 * 5 * 16  # the unconditional half: null label


def test_plot_tool_writes_pngs(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "plots"
    res = subprocess.run(
        [sys.executable, "tools/plot_telemetry.py", str(runs["two"]), "--out", str(out)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    names = {p.name for p in out.glob("*.png")}
    assert names == {
        "tokens_per_expert_layer0.png",
        "capacity.png",
        "compute_vs_t.png",
        "compute_vs_class.png",
        "predictor_pr.png",
    }
    for p in out.glob("*.png"):
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [sys.executable, "tools/plot_telemetry.py", str(tmp_path / "nope")],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "metrics.jsonl does not exist" in bad.stderr


def test_peak_memory_source(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU: the process's peak RSS. CUDA cannot exist here, so its allocator query is replaced by a
    # stand-in only to check that a cuda device reads GPU memory, not RSS.
    assert peak_mem_mb(torch.device("cpu")) == pytest.approx(peak_rss_mb(), rel=0.05)
    assert peak_mem_mb(None) > 0
    seen = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: seen.append(d) or 3 * 2**20)
    assert peak_mem_mb(torch.device("cuda", 1)) == 3.0 and seen == [torch.device("cuda", 1)]
