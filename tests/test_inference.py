"""diffmoe_dist.inference.load_model: the one loader of sample / eval / sweep / routing study.

A real 2-step run (world 1, in process) writes a checkpoint; load_model must build exactly one
DiffMoE, fill it with the checkpoint's EMA (default) or live weights bit for bit, carry the MoE
thresholds, and return it in eval mode with the configured inference rule.
"""

from __future__ import annotations

from pathlib import Path

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
