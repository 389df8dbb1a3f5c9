"""Numerics for GPU runs, shown on CPU where a CPU can show them (issue 18 items 9, 10, 12):
bf16 expert dispatch under autocast, sampling under bf16 autocast, deterministic mode.
What only a GPU shows (TF32, cuBLAS determinism, NCCL) is in tools/gpu_smoke.sh / docs/gpu.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from helpers_run import TINY, read_metrics, train_in_process

from diffmoe_dist.config import load_config
from diffmoe_dist.models.dit import DiffMoE


def _dispatch_bytes(rank: int, world: int) -> dict:
    """One forward + backward of a tiny DiffMoE with ep=2, in fp32 and under bf16 autocast."""
    from diffmoe_dist.parallel.dispatch import a2a_bytes_summary
    from diffmoe_dist.parallel.parallelize import build_parallel_state, parallelize_model

    cfg = load_config(TINY, ["parallel.ep=2", "train.global_batch_size=8", "moe.pool_samples=4"])
    ps = build_parallel_state(cfg, world, rank)
    torch.manual_seed(0)
    model = parallelize_model(DiffMoE(cfg.model, cfg.moe), ps).train()
    g = torch.Generator().manual_seed(rank)
    x, t = torch.randn(4, 1, 16, 16, generator=g), torch.rand(4, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    out = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v = model(x, t, y)
        v.float().square().mean().backward()
        out[name] = a2a_bytes_summary(model)["total"]
    return out


def test_bf16_dispatch_halves_token_bytes() -> None:
    res = run_distributed(_dispatch_bytes, 2, timeout_s=180)
    for r in res:
        fp32, bf16 = r["fp32"], r["bf16"]
        assert fp32["tokens_sent"] > 0
        for key in ("tokens_sent", "tokens_recv", "tokens_bwd_sent", "tokens_bwd_recv"):
            # expert choice, pool on one rank: k tokens per expert, so the same rows travel
            assert bf16[key] * 2 == fp32[key], (key, bf16[key], fp32[key])


def test_expert_weights_in_bf16_are_not_copied_to_fp32() -> None:
    # DeepSpeed bf16: the experts' weights are bf16. The tokens follow them (no fp32 weight copies).
    from diffmoe_dist.models.moe import expert_compute_dtype

    x = torch.zeros(2, 3)
    assert expert_compute_dtype(x, torch.zeros(1, dtype=torch.bfloat16)) == torch.bfloat16
    assert expert_compute_dtype(x, torch.zeros(1)) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert expert_compute_dtype(x, torch.zeros(1)) == torch.bfloat16


def test_sampling_under_bf16_autocast() -> None:
    from diffmoe_dist.inference import CapacityMeter, generate

    cfg = load_config(TINY, ["sample.num_steps=4", "sample.cfg_scale=2.0"])
    torch.manual_seed(0)
    model = DiffMoE(cfg.model, cfg.moe).eval()
    with torch.no_grad():  # DiT zero-inits the output layer: give it weights so outputs differ
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.02)
    seen: list[torch.dtype] = []
    model.final_layer.linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    labels = torch.arange(8) % 10
    outs = {}
    for precision in ("fp32", "bf16"):
        cfg.sample.precision = precision
        seen.clear()
        meter = CapacityMeter()
        outs[precision] = generate(model, cfg, labels, 0, torch.device("cpu"), meter)
        assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert meter.pairs and all(p > 0 for p in meter.pairs)
    a, b = outs["fp32"], outs["bf16"]
    assert b.dtype == torch.float32 and torch.isfinite(b).all()  # the ODE integrates in fp32
    assert not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=0, atol=0.05)  # bf16 rounding, 4 Euler steps


def test_sample_precision_resolution() -> None:
    from diffmoe_dist.parallel.numerics import resolve_sample_precision

    assert resolve_sample_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_sample_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_sample_precision("tf32", torch.device("cpu")) == "tf32"
    with pytest.raises(ValueError, match="sample.precision"):
        load_config(TINY, ["sample.precision=fp16"])


def test_deterministic_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert train_in_process(tmp_path / "a", "train.steps=2") == 0
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        assert train_in_process(tmp_path / "b", "train.steps=2", "train.deterministic=true") == 0
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    # on CPU both modes run the same kernels: the same losses, bit for bit
    loss = [[r["loss"] for r in read_metrics(tmp_path / d)] for d in "ab"]
    assert loss[0] == loss[1] and len(loss[0]) == 2


def test_telemetry_and_label_embedder_never_read_device_values() -> None:
    # On a GPU every host read of a device value (float(), int(), .cpu(), .tolist()) stops the host
    # until the GPU catches up. Tensors on the meta device have no values, so any such read raises:
    # running the per-forward paths on meta tensors shows they do none (issue 18 item 11).
    import dataclasses

    from diffmoe_dist.models.embeddings import LabelEmbedder
    from diffmoe_dist.telemetry import ExpertTelemetry

    cfg = load_config(TINY, [])
    torch.manual_seed(0)
    model = DiffMoE(cfg.model, cfg.moe).train()
    x, t, y = torch.randn(4, 1, 16, 16), torch.rand(4), torch.tensor([0, 1, 2, 10])
    model(x, t, y)
    meta = torch.device("meta")
    stats = [
        dataclasses.replace(
            s,
            **{
                k: getattr(s, k).to(meta)
                for k in ("expert_counts", "token_pairs", "pred_mask", "route_mask")
                if getattr(s, k) is not None
            },
        )
        for s in model.moe_stats()
    ]
    tele = ExpertTelemetry(cfg.model.num_classes)
    tele.add(stats, t.to(meta), y.to(meta))  # counts, precision/recall, buckets: all on device
    assert tele.counts.device == meta and tele.pr.device == meta
    emb = LabelEmbedder(10, 8).to(meta).eval()  # inference: the sampler's per-step forward
    assert emb(y.to(meta)).shape == (4, 8)
    # on CPU labels at inference the check still runs (free there)
    with pytest.raises(ValueError, match="class labels must be in"):
        LabelEmbedder(10, 8).eval()(torch.tensor([11]))
    # at a log step the counters come back to the host once, and the numbers are the CPU ones
    ref = ExpertTelemetry(cfg.model.num_classes)
    ref.add(model.moe_stats(), t, y)
    ref.reduce(None)
    assert ref.counts.device.type == "cpu" and ref.summary()["pred_precision"] is not None
