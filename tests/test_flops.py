"""Model FLOPs (diffmoe_dist/models/flops.py) against torch's FlopCounterMode, and the trainer's MFU metric.

The analytic count is what MFU divides by, so it is checked against the matmuls torch actually
runs in a forward of a real model, in every routing mode, through the layer's own fast path (tc's
uneven counts included: they run exact per-expert matmuls, no padding rows).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(__file__))
from helpers_run import read_metrics, train_in_process  # noqa: E402

from diffmoe_dist.config import ModelConfig, MoEConfig  # noqa: E402
from diffmoe_dist.models.dit import DiffMoE  # noqa: E402
from diffmoe_dist.models.flops import (  # noqa: E402
    forward_flops_per_sample,
    moe_pairs_per_token,
    peak_bf16_flops,
    train_flops_per_sample,
)

MODEL = ModelConfig(
    input_size=8, in_channels=3, patch_size=2, depth=4, hidden_size=32, num_heads=2, num_classes=10
)


def counted_forward_flops(moe: MoEConfig, batch: int) -> float:
    torch.manual_seed(0)
    model = DiffMoE(MODEL, moe).train()
    x = torch.randn(batch, MODEL.in_channels, MODEL.input_size, MODEL.input_size)
    t, y = torch.rand(batch), torch.randint(0, MODEL.num_classes, (batch,))
    # The math SDPA backend runs attention as matmuls the counter sees (it has no formula for the
    # fused CPU kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x, t, y)
    return fc.get_total_flops() / batch


@pytest.mark.parametrize(
    "moe",
    [
        MoEConfig(mode="dense"),
        MoEConfig(mode="diffmoe", num_experts=4, capacity=1.0, pool_samples=2),
        MoEConfig(mode="diffmoe", num_experts=4, capacity=2.0, pool_samples=4),
        MoEConfig(mode="diffmoe", num_experts=4, capacity=1.0, pool_samples=2, predictor=False),
        MoEConfig(mode="ec", num_experts=4, capacity=1.0, pool_samples=2),
        MoEConfig(
            mode="ec", num_experts=3, capacity=1.0, pool_samples=2
        ),  # k = floor(16/3) = 5: 15 of 16 pairs
        MoEConfig(mode="tc", num_experts=4, pool_samples=2),
    ],
    ids=["dense", "diffmoe", "diffmoe-c2", "diffmoe-nopred", "ec", "ec-floor", "tc"],
)
def test_forward_flops_match_flop_counter(moe: MoEConfig) -> None:
    want = counted_forward_flops(moe, batch=4)
    got = forward_flops_per_sample(MODEL, moe)
    assert got["total"] == pytest.approx(want, rel=1e-12)
    assert train_flops_per_sample(MODEL, moe) == pytest.approx(3 * want, rel=1e-12)
    if moe.mode == "diffmoe" and moe.predictor:
        assert got["predictor"] > 0
    else:
        assert got["predictor"] == 0


def test_pairs_per_token_hand_computed() -> None:
    T = 256
    assert moe_pairs_per_token(MoEConfig(mode="diffmoe", num_experts=16, pool_samples=64), T) == 1.0
    # EC over 16 tokens with 3 experts: k = 5 per expert -> 15 pairs over 16 tokens
    assert moe_pairs_per_token(MoEConfig(mode="ec", num_experts=3), 16) == pytest.approx(15 / 16)
    assert moe_pairs_per_token(MoEConfig(mode="tc", num_experts=8, capacity=2.0), T) == 1.0
    with pytest.raises(ValueError, match="dense"):
        moe_pairs_per_token(MoEConfig(mode="dense"), T)


@pytest.mark.parametrize(
    "depth,width,gflops", [(28, 1152, 118.6), (24, 1024, 80.7), (12, 768, 23.01), (12, 384, 6.06)]
)
def test_dit_matches_published_gflops(depth: int, width: int, gflops: float) -> None:
    # DiT-XL/L/B/S at patch 2, 256x256 (32x32 latents): the DiT paper's forward Gflops, which count a
    # multiply-add once; ours counts it as 2. A DiffMoE model activates the same FFN per token.
    m = ModelConfig(input_size=32, patch_size=2, depth=depth, hidden_size=width, num_heads=16)
    dense = forward_flops_per_sample(m, MoEConfig(mode="dense"))
    assert dense["total"] / 2 / 1e9 == pytest.approx(gflops, rel=2e-3)
    moe = forward_flops_per_sample(m, MoEConfig(mode="diffmoe", num_experts=16))
    assert moe["experts"] + moe["ffn"] == pytest.approx(dense["ffn"])


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),  # SXM5
        ("NVIDIA H100 PCIe", 756.0e12),
        ("NVIDIA H100 NVL", 835.5e12),  # "H100" inside it must not pick the SXM peak
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H200 NVL", 835.5e12),
        ("NVIDIA GH200 480GB", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312.0e12),
        ("NVIDIA A100-PCIE-40GB", 312.0e12),
        ("NVIDIA H100 SOMETHING", None),  # an unknown variant: no peak rather than a wrong one
        ("NVIDIA H800", None),
        ("cpu", None),
    ],
)
def test_peak_lookup(name: str, peak: float | None) -> None:
    got = peak_bf16_flops(name)
    assert got == (pytest.approx(peak) if peak else None)


def test_trainer_logs_tflops_and_mfu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A real run of tiny.yaml with a declared peak: tflops_per_rank and mfu follow from samples_per_s.
    d = tmp_path / "run"
    rc = train_in_process(d, "train.steps=3", "train.peak_tflops=0.002")
    assert rc == 0, capsys.readouterr().err[-2000:]
    from diffmoe_dist.config import load_config

    cfg = load_config(d / "config.yaml")
    per_sample = train_flops_per_sample(cfg.model, cfg.moe)
    recs = read_metrics(d)
    assert len(recs) == 3
    for r in recs:
        want = r["samples_per_s"] * per_sample / r["world_size"] / 1e12
        assert r["tflops_per_rank"] == pytest.approx(want, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops_per_rank"] / 0.002, rel=1e-9)


def test_no_mfu_without_a_peak(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "run"
    assert train_in_process(d, "train.steps=1") == 0, capsys.readouterr().err[-2000:]
    (r,) = read_metrics(d)
    assert r["tflops_per_rank"] > 0 and "mfu" not in r


def test_negative_peak_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_in_process(tmp_path / "r", "train.peak_tflops=-1") == 2
    assert "train.peak_tflops" in capsys.readouterr().err
