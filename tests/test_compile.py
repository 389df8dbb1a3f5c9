"""train.compile: torch.compile per DiT block leaves the training math unchanged.

One process, the tiny DiffMoE (1 dense + 1 MoE block), 4 steps with and without compile. Inductor
fuses the elementwise work of the attention half and of the dense blocks, so sums can round in
another order: the loss curves must agree to fp32 rounding (rtol 1e-5), not bit for bit. The MoE
layer stays eager under compile (routing and the dispatcher are never traced), so the expert-parallel
equality tests cover it unchanged. A first compile costs seconds: this file runs one compiled run.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers_run import losses, train_in_process  # noqa: E402

from diffmoe_dist.parallel.parallelize import check_compile_supported  # noqa: E402

STEPS = ["train.steps=4", "train.ckpt_every=100", "train.save_final=false", "data.prefetch=false"]


def test_compile_keeps_the_loss_curve(tmp_path):
    assert train_in_process(tmp_path / "eager", *STEPS) == 0
    assert train_in_process(tmp_path / "compiled", *STEPS, "train.compile=true") == 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3, 4]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5, abs=1e-7), step
    # the run really compiled: dynamo recorded frames for the blocks
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] > 0


def test_compile_without_a_compiler_is_refused_up_front(monkeypatch, tmp_path):
    # No C++ compiler on PATH and no $CXX: the check names the key before any step runs.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match=r"train\.compile=true .* C\+\+ compiler"):
        check_compile_supported(torch.device("cpu"))
