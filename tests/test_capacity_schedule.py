"""moe.capacity_schedule (linear): capacity E up to stage 1, linear decay to moe.capacity at stage 2.

Checked: the schedule's values against the public code's formula; k and the threshold statistics of a
real layer at capacity E; a real training run's routed capacity and FLOP accounting per step; a run
stopped and resumed mid-schedule equals the uninterrupted one exactly; bad stages are refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_run import TINY, train_in_process

from diffmoe_dist.config import load_config
from diffmoe_dist.models.capacity_schedule import capacity_at, moe_at_step
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.models.flops import train_flops_per_sample
from diffmoe_dist.trainer.metrics import read_metrics

# tiny.yaml: E = 4, pools of 4 samples x 16 tokens = 64 tokens
SCHEDULE = ("moe.capacity_schedule=linear", "moe.stage1_steps=1", "moe.stage2_steps=4")
STEPS = 6


def _public_code(E: int, C: float, s1: int, s2: int, it: int) -> float:
    # models_DiffMoE.py (DiffMoE public code), DiT.forward: the training capacity at iteration it
    if it <= s1:
        return E
    if it <= s2:
        return C + (E - C) * (s2 - it) / (s2 - s1)
    return C


def test_schedule_values_follow_the_public_code() -> None:
    cfg = load_config(
        TINY,
        ["moe.num_experts=8", "moe.capacity=1.0", "moe.capacity_schedule=linear"]
        + ["moe.stage1_steps=10", "moe.stage2_steps=30"],
    )
    for step in range(0, 40):
        assert capacity_at(cfg.moe, step) == pytest.approx(_public_code(8, 1.0, 10, 30, step))
    assert capacity_at(cfg.moe, 0) == 8.0 and capacity_at(cfg.moe, 20) == pytest.approx(4.5)
    assert capacity_at(load_config(TINY).moe, 0) == 1.0  # none: always moe.capacity


def test_capacity_e_routes_every_token_and_thresholds_use_that_k() -> None:
    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = DiffMoE(cfg.model, cfg.moe).train()
    model.set_train_capacity(4.0)  # = E
    x, t, y = torch.randn(4, 1, 16, 16), torch.rand(4), torch.arange(4)
    model(x, t, y)
    layer = next(model.moe_layers())
    st = layer.stats
    assert bool(st.route_mask.all()) and st.capacity == pytest.approx(4.0)  # k = S: all tokens
    # k = S: the k-th largest predictor probability of the pool is its minimum
    blocks = list(model.blocks)
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    h = blocks[0](h, c)
    b1 = blocks[1]
    shift_a, scale_a, gate_a, shift_f, scale_f, _ = b1.adaLN_modulation(c).chunk(6, dim=1)
    from diffmoe_dist.models.blocks import modulate

    h = h + gate_a.unsqueeze(1) * b1.attn(modulate(b1.norm1(h), shift_a, scale_a))
    inp = modulate(b1.norm2(h), shift_f, scale_f).reshape(-1, h.shape[-1])
    probs = torch.sigmoid(layer.predictor(inp).float())  # [64, E], one pool
    torch.testing.assert_close(st.kth_sum / st.kth_count, probs.min(0).values)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("capsched")
    straight, resumed = root / "straight", root / "resumed"
    common = (*SCHEDULE, "train.ckpt_every=100")
    assert train_in_process(straight, f"train.steps={STEPS}", *common) == 0
    assert train_in_process(resumed, "train.steps=3", *common) == 0  # stops mid-decay
    assert train_in_process(resumed, f"train.steps={STEPS}", *common) == 0
    return {"straight": straight, "resumed": resumed}


def test_training_capacity_and_flops_follow_the_schedule(runs: dict[str, Path]) -> None:
    cfg = load_config(TINY, list(SCHEDULE))
    recs = read_metrics(runs["straight"])
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        want = capacity_at(cfg.moe, r["step"] - 1)  # metrics' step s is 0-based step s - 1
        assert r["capacity_per_layer"] == [pytest.approx(want)], r["step"]
        # tflops_per_rank = samples/s * FLOPs per sample of that step (log_every = 1)
        fps = r["tflops_per_rank"] * 1e12 / r["samples_per_s"]
        assert fps == pytest.approx(
            train_flops_per_sample(cfg.model, moe_at_step(cfg.moe, r["step"] - 1)), rel=1e-9
        )
    assert [r["capacity_per_layer"][0] for r in recs] == pytest.approx([4, 4, 3, 2, 1, 1])


def test_resume_mid_schedule_is_exact(runs: dict[str, Path]) -> None:
    a, b = read_metrics(runs["straight"]), read_metrics(runs["resumed"])
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        for key in ("loss", "flow_loss", "cp_loss", "capacity_per_layer", "thresholds"):
            assert ra[key] == rb[key], (ra["step"], key)


@pytest.mark.parametrize(
    "sets,words",
    [
        (
            ["moe.stage1_steps=5", "moe.stage2_steps=5"],
            ["moe.stage1_steps=5", "moe.stage2_steps=5"],
        ),
        (
            ["moe.stage1_steps=9", "moe.stage2_steps=3"],
            ["moe.stage1_steps=9", "moe.stage2_steps=3"],
        ),
        (["moe.stage1_steps=-1", "moe.stage2_steps=3"], ["moe.stage1_steps=-1"]),
        (["moe.mode=tc", "moe.stage2_steps=3"], ["moe.capacity_schedule='linear'", "'tc'"]),
    ],
)
def test_bad_schedule_is_refused(sets: list[str], words: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        load_config(TINY, ["moe.capacity_schedule=linear", *sets])
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    with pytest.raises(ValueError, match="moe.capacity_schedule"):
        load_config(TINY, ["moe.capacity_schedule=cosine"])
