"""diffmoe_dist.inference: the loader, the parts store, the files a sampling run leaves.

- load_model, the one loader of sample / eval / sweep / routing study: a real 2-step run (world 1, in
  process) writes a checkpoint; load_model must build exactly one DiffMoE, fill it with the
  checkpoint's EMA (default) or live weights bit for bit, carry the MoE thresholds, and return it in
  eval mode with the configured inference rule.
- PartsStore (inference/parts.py) on real files: resume, refusal of other settings, a torn write.
- save_samples: grid.png, samples.npz (ADM layout) and sample_report.json, readable back.
- The package's API: inference/ modules and their callers import no private name of another module.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_run import checkpoint_tensors, latest_checkpoint, train_in_process

import diffmoe_dist.inference as inference
from diffmoe_dist.checkpoint import model_state
from diffmoe_dist.inference import load_sampling_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("inference") / "run"
    assert train_in_process(run, "train.steps=2", "train.ckpt_every=2") == 0
    return latest_checkpoint(run)


@pytest.mark.parametrize("use_ema", [True, False])
def test_load_model_builds_one_model_with_the_chosen_weights(
    ckpt: Path, use_ema: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = []

    import diffmoe_dist.parallel.parallelize as parallelize

    class Counting(parallelize.DiffMoE):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    monkeypatch.setattr(parallelize, "DiffMoE", Counting)
    cfg = load_sampling_config(ckpt, ["moe.infer_mode=static", "moe.infer_capacity=1.0"])
    loaded = inference.load_model(cfg, ckpt, use_ema=use_ema)
    assert len(built) == 1 and loaded.net is built[0] and not loaded.net.training
    assert loaded.checkpoint == ckpt and loaded.meta["step"] == 2
    assert all(m.infer_rule == "static" for m in loaded.net.moe_layers())
    saved = checkpoint_tensors(ckpt)
    prefix = "ema." if use_ema else "model."
    mine = model_state(loaded.net, prefix)
    assert mine and set(mine) <= set(saved)
    for k, v in mine.items():
        assert torch.equal(v, saved[k]), k
    other = "model." if use_ema else "ema."
    differ = [k for k in mine if not torch.equal(saved[k], saved[other + k[len(prefix) :]])]
    assert differ  # the two copies differ after 2 steps: loading one is a real choice


# ---- the parts store


def _fingerprint(**change: object) -> dict:
    base = {"checkpoint": "/runs/a/checkpoints/step-00000002", "num_samples": 6, "cfg_scale": 2.0}
    return {**base, **change}


def _write(store: inference.PartsStore, rank: int, idx: list[int], layers: int = 2) -> None:
    images = np.stack([np.full((4, 4, 1), i, np.uint8) for i in idx])  # pixel value = index
    ones = [len(idx)] * layers  # 1 pair per token per layer
    store.write(rank, torch.tensor(idx), images, torch.tensor(idx) % 3, ones, ones)


def test_parts_store_resumes_refuses_other_settings_and_ignores_torn_writes(
    tmp_path: Path,
) -> None:
    store = inference.PartsStore(tmp_path / "parts")
    assert store.prepare(_fingerprint(), 6, rank=0) == set()
    assert json.loads(store.run_file.read_text()) == _fingerprint()
    _write(store, 0, [0, 1])
    _write(store, 1, [4, 5])
    # What a kill during np.savez leaves: a temporary name, never a part-*.npz.
    (store.root / ".part-00000002-r0000.npz.tmp").write_bytes(b"PK\x03\x04 cut")
    assert store.prepare(_fingerprint(), 6, rank=1) == {0, 1, 4, 5}  # rank 1 only reads
    with pytest.raises(ValueError, match=r"2 of 6 samples missing \(first \[2, 3\]\)"):
        store.read(6)
    with pytest.raises(ValueError, match=r"run\.json.*different \['cfg_scale'\]"):
        store.prepare(_fingerprint(cfg_scale=3.0), 6, rank=0)
    assert json.loads(store.run_file.read_text()) == _fingerprint()  # the refusal changed nothing
    _write(store, 0, [2, 3])
    images, pairs, tokens = store.read(6)
    assert images.shape == (6, 4, 4, 1) and [int(v) for v in images[:, 0, 0, 0]] == list(range(6))
    assert pairs == tokens == [6, 6]  # summed over the three parts, per layer
    store.remove()
    assert not store.root.exists()


def test_parts_store_without_parts_takes_new_settings(tmp_path: Path) -> None:
    store = inference.PartsStore(tmp_path / "parts")
    store.prepare(_fingerprint(), 6, rank=0)
    # A run that stopped before its first part: nothing to mix, the new settings replace run.json.
    assert store.prepare(_fingerprint(cfg_scale=3.0), 6, rank=0) == set()
    assert json.loads(store.run_file.read_text())["cfg_scale"] == 3.0


def test_run_fingerprint_names_what_the_samples_depend_on(ckpt: Path) -> None:
    cfg = load_sampling_config(ckpt, [])
    labels = torch.arange(cfg.sample.num_samples) % 10
    fp = inference.run_fingerprint(cfg, ckpt, labels)
    assert fp == inference.run_fingerprint(cfg, ckpt, labels.clone())
    assert fp != inference.run_fingerprint(cfg, ckpt, labels.flip(0))
    other = load_sampling_config(ckpt, ["moe.infer_mode=gamma", "moe.gamma=0.3"])
    assert fp["infer"] != inference.run_fingerprint(other, ckpt, labels)["infer"]


# ---- the driver's split of a run over ranks


@pytest.mark.parametrize("todo", [list(range(10)), [1, 4, 5, 8, 9], [7], []])
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_rank_share_covers_each_index_once_in_equal_shares(
    todo: list[int], world_size: int
) -> None:
    t = torch.tensor(todo, dtype=torch.long)
    shares = [inference.rank_share(t, world_size, r) for r in range(world_size)]
    assert len({len(idx) for idx, _ in shares}) == 1  # the same number of batches on every rank
    kept = [int(i) for idx, valid in shares for i in idx[valid]]
    assert kept == todo  # each index once, in order (contiguous slices by rank)
    for idx, _ in shares:  # padding repeats a real index (a valid sample to run, then dropped)
        assert all(int(i) in todo for i in idx) and idx.dtype == torch.long


# ---- the files of a sampling run


def test_save_samples_writes_grid_npz_and_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(12) % 4
    report = {"c_infer": 0.97, "num_samples": 12}
    inference.save_samples(tmp_path / "out", images, labels, report, npz=True)
    with np.load(tmp_path / "out" / "samples.npz") as d:
        assert np.array_equal(d["arr_0"], images) and np.array_equal(d["labels"], labels)
    assert json.loads((tmp_path / "out" / "sample_report.json").read_text()) == report
    assert (tmp_path / "out" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "grid.png",
        "sample_report.json",
        "samples.npz",
    ]  # no temporary file left behind
    inference.save_samples(tmp_path / "bare", images, labels, report, npz=False)
    assert not (tmp_path / "bare" / "samples.npz").exists()


# ---- the API


def test_inference_callers_import_no_private_names() -> None:
    """Modules share public functions only (a private one is free to change under its caller)."""
    root = Path(__file__).resolve().parents[1]
    files = [*(root / "diffmoe_dist").rglob("*.py"), *(root / "tools").glob("*.py")]
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                ("diffmoe_dist.inference", "diffmoe_dist.sample", "diffmoe_dist.evaluate")
            ):
                bad += [
                    f"{path.name}:{node.lineno} {a.name}" for a in node.names if a.name[0] == "_"
                ]
            in_inference = (
                path.parent.name == "inference" and path.parent.parent.name == "diffmoe_dist"
            )
            if in_inference and isinstance(node, ast.ImportFrom) and node.module:
                bad += [
                    f"{path.name}:{node.lineno} {a.name}" for a in node.names if a.name[0] == "_"
                ]
    assert not bad, bad
    assert set(inference.__all__) <= set(dir(inference))
