"""The DiT/DiffMoE model (models/dit.py, blocks.py, embeddings.py, registry.py, params.py) and
tools/count_params.py: adaLN-Zero init, MoE placement, parameter counts against DESIGN.md, shapes,
router init, the null label, and the counting tool's JSON output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffmoe_dist.config import Config, ModelConfig, MoEConfig, load_config
from diffmoe_dist.models.blocks import DiTBlock
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.models.embeddings import LabelEmbedder
from diffmoe_dist.models.moe import FeedForward, MoELayer
from diffmoe_dist.models.params import count_params
from diffmoe_dist.models.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
MODES = ["dense", "tc", "ec", "diffmoe"]


def tiny(mode: str = "diffmoe", depth: int = 4, **model_kw) -> DiffMoE:
    torch.manual_seed(0)
    kw = dict(input_size=8, in_channels=2, patch_size=2, depth=depth, hidden_size=16, num_heads=2)
    kw.update(model_kw)
    m = ModelConfig(num_classes=5, **kw)
    return DiffMoE(m, MoEConfig(mode=mode, num_experts=4, pool_samples=2))


def meta_model(cfg: Config) -> DiffMoE:
    with torch.device("meta"):
        return DiffMoE(cfg.model, cfg.moe)


def hand_count(
    depth: int,
    D: int,
    E: int,
    mode: str,
    input_size: int = 32,
    patch: int = 2,
    C: int = 4,
    num_classes: int = 1000,
) -> tuple[int, int]:
    """(total, activated) from the architecture, layer by layer (the way the DiT paper counts).

    Norms have no affine parameters (adaLN supplies shift/scale); pos_embed is a frozen parameter.
    """
    T = (input_size // patch) ** 2
    ffn = D * 4 * D + 4 * D + 4 * D * D + D
    embed = (C * patch * patch * D + D) + T * D + (256 * D + D + D * D + D) + (num_classes + 1) * D
    block_common = (3 * D * D + 3 * D) + (D * D + D) + (D * 6 * D + 6 * D)
    final = (D * 2 * D + 2 * D) + (D * patch * patch * C + patch * patch * C)
    n_moe = depth // 2 if mode != "dense" else 0
    activated = embed + depth * (block_common + ffn) + final
    router = E * D
    predictor = (D * D + D) + (D * E + E) if mode == "diffmoe" else 0
    total = activated + n_moe * ((E - 1) * ffn + router + predictor)
    return total, activated


# --------------------------------------------------------------------------------------------------
# adaLN-Zero


@pytest.mark.parametrize("mode", MODES)
def test_output_is_exactly_zero_at_init(mode: str) -> None:
    model = tiny(mode).train()
    x = torch.randn(4, 2, 8, 8)
    out = model(x, torch.rand(4), torch.tensor([0, 1, 5, 3]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("mode", MODES)
def test_every_block_is_identity_at_init(mode: str) -> None:
    model = tiny(mode).train()
    x = torch.randn(2, 16, 16)
    c = torch.randn(2, 16)
    for i, block in enumerate(model.blocks):
        assert torch.equal(block(x, c), x), f"block {i}"


def test_blocks_are_not_identity_after_adaln_moves() -> None:
    # Guards the identity test: with a non-zero modulation the block changes its input.
    model = tiny("diffmoe")
    block = model.blocks[1]
    with torch.no_grad():
        block.adaLN_modulation[-1].bias.fill_(0.5)
    x = torch.randn(2, 16, 16)
    assert not torch.allclose(block(x, torch.randn(2, 16)), x)


# --------------------------------------------------------------------------------------------------
# structure


@pytest.mark.parametrize("depth", [1, 4, 5])
def test_moe_on_odd_blocks_only(depth: int) -> None:
    model = tiny("diffmoe", depth=depth)
    for i, block in enumerate(model.blocks):
        assert isinstance(block, DiTBlock)
        if i % 2 == 1:
            assert isinstance(block.ffn, MoELayer) and block.ffn.layer_id == i
        else:
            assert isinstance(block.ffn, FeedForward) and not block.is_moe
    assert len(list(model.moe_layers())) == depth // 2


def test_dense_model_has_no_moe() -> None:
    model = tiny("dense")
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert not any("router" in n for n, _ in model.named_parameters())


def test_router_init_std_not_xavier() -> None:
    # D = 384, E = 16: xavier-uniform would give std sqrt(2 / (384 + 16)) = 0.0707; DiffMoE uses 0.006.
    model = tiny("diffmoe", depth=4, hidden_size=384, num_heads=6, input_size=4)
    for layer in model.moe_layers():
        w = layer.router.weight
        assert w.shape == (4, 384)
        assert 0.0054 < w.std().item() < 0.0066
        assert abs(w.mean().item()) < 0.001
        # normal, not uniform: some entries beyond 2 std (a uniform init with this std caps at 1.73 std)
        assert w.abs().max().item() > 2 * 0.006


# --------------------------------------------------------------------------------------------------
# label embedder


def test_label_embedder_null_row_and_range() -> None:
    # checked at inference (eval); in training the trainer checks labels on the host (issue 15)
    emb = LabelEmbedder(10, 8).eval()
    assert emb.embedding_table.weight.shape == (11, 8)  # 10 classes + the null class
    out = emb(torch.tensor([0, 9, 10]))
    torch.testing.assert_close(out[2], emb.embedding_table.weight[10])
    for bad in ([-1], [11], [3, 12]):
        with pytest.raises(ValueError, match="class labels"):
            emb(torch.tensor(bad))


def test_model_rejects_bad_label() -> None:
    model = tiny("dense").eval()
    with pytest.raises(ValueError):
        model(torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([0, 6]))  # null class is 5


# --------------------------------------------------------------------------------------------------
# forward / backward in all modes


@pytest.mark.parametrize("mode", MODES)
def test_forward_backward_shapes(mode: str) -> None:
    model = tiny(mode).train()
    # Move off the adaLN-Zero init so every parameter can receive a gradient.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    x = torch.randn(4, 2, 8, 8)
    out = model(x, torch.rand(4), torch.tensor([0, 1, 2, 5]))
    assert out.shape == (4, 2, 8, 8)
    loss = out.square().mean()
    aux = model.aux_losses()
    loss = loss + aux["cp_loss"] + aux["balance_loss"]
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.shape == p.shape, name
    if mode != "dense":
        routers = [layer.router.weight.grad for layer in model.moe_layers()]
        assert all(g.abs().sum() > 0 for g in routers)
    assert (aux["cp_loss"] > 0) == (mode == "diffmoe")
    assert (aux["balance_loss"] > 0) == (mode == "tc")


def test_one_rank_zero_grad_frees_gradients_and_keeps_the_weights() -> None:
    # In a one-rank world trainer/optim.zero_grad frees the gradients (backward hands each parameter
    # a new tensor instead of zeroing and adding into it); the weights after several AdamW steps,
    # DiffMoE with its predictor, must equal those of zeroing in place, bit for bit.
    from diffmoe_dist.config import TrainConfig
    from diffmoe_dist.trainer.optim import torch_adamw, zero_grad

    def train(free: bool) -> list[torch.Tensor]:
        model = tiny("diffmoe").train()
        opt = torch_adamw([p for p in model.parameters() if p.requires_grad], TrainConfig(lr=1e-2))
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            if free:
                zero_grad(opt)
                assert all(p.grad is None for p in model.parameters())
            else:
                opt.zero_grad(set_to_none=False)
            x = torch.randn(4, 2, 8, 8, generator=gen)
            out = model(x, torch.rand(4, generator=gen), torch.tensor([0, 1, 2, 5]))
            (out.square().mean() + model.aux_losses()["cp_loss"]).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(True), train(False), strict=True):
        assert torch.equal(a, b)


def test_eval_forward_shapes_all_modes() -> None:
    for mode in MODES:
        model = tiny(mode).eval()
        with torch.no_grad():
            out = model(torch.randn(3, 2, 8, 8), torch.rand(3), torch.tensor([0, 1, 5]))
        assert out.shape == (3, 2, 8, 8)


# --------------------------------------------------------------------------------------------------
# parameter counts


def test_hand_count_matches_count_params_on_tiny_models() -> None:
    for mode in MODES:
        model = tiny(mode, depth=5)
        got = count_params(model)
        assert (got["total"], got["activated"]) == hand_count(
            5, 16, 4, mode, input_size=8, C=2, num_classes=5
        ), mode
        if mode == "dense":
            assert got["total"] == sum(p.numel() for p in model.parameters())


# DESIGN.md, section 1: (total M, activated M); XL-E16's total is "about 2925M".
DESIGN_COUNTS = {
    "DiffMoE-S-E16": (140.3, 33.0),
    "DiffMoE-B-E16": (559.2, 130.5),
    "DiffMoE-L-E8": (1176.0, 458.1),
    "DiffMoE-L-E16": (1982.0, 458.1),
    "DiffMoE-XL-E16": (2925.0, 675.1),
}
DENSE_ACTIVATED = {"S": 33.0, "B": 130.5, "L": 458.1, "XL": 675.1}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_counts_match_design(name: str) -> None:
    cfg = load_config(None, [f"model.name={name}"])
    got = count_params(meta_model(cfg))
    size = next(part for part in name.split("-") if part in DENSE_ACTIVATED)
    assert got["activated"] / 1e6 == pytest.approx(DENSE_ACTIVATED[size], rel=2e-3)
    if name in DESIGN_COUNTS:
        total, activated = DESIGN_COUNTS[name]
        assert got["total"] / 1e6 == pytest.approx(total, rel=1e-3)
        assert got["activated"] / 1e6 == pytest.approx(activated, rel=2e-3)
    # Every registry entry, also those without a DESIGN.md row, against the layer-by-layer count.
    m = cfg.model
    assert (got["total"], got["activated"]) == hand_count(
        m.depth, m.hidden_size, cfg.moe.num_experts, cfg.moe.mode
    )
    if cfg.moe.mode == "dense":
        assert got["total"] == got["activated"]


def test_meta_build_allocates_nothing() -> None:
    model = meta_model(load_config(None, ["model.name=DiffMoE-XL-E16"]))
    assert all(p.device.type == "meta" for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# tools/count_params.py


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/count_params.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_count_params_tool_json(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: DiffMoE-S-E16\n  num_classes: 10\nmoe:\n  num_experts: 8\n")
    r = _run_tool("--config", str(cfg), "--set", "model.depth=6", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert set(got) == {"total", "activated"}
    assert (got["total"], got["activated"]) == hand_count(6, 384, 8, "diffmoe", num_classes=10)


def test_count_params_tool_name_and_table() -> None:
    r = _run_tool("--name", "DiffMoE-L-E16", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["total"] / 1e6 == pytest.approx(1982.0, rel=1e-3)
    assert got["activated"] / 1e6 == pytest.approx(458.1, rel=2e-3)
    r = _run_tool("--name", "Dense-DiT-S")
    assert r.returncode == 0, r.stderr
    assert "total" in r.stdout and "activated" in r.stdout and "Dense-DiT-S" in r.stdout


def test_count_params_tool_bad_key() -> None:
    r = _run_tool("--name", "DiffMoE-S-E16", "--set", "model.bogus=1", "--json")
    assert r.returncode != 0
    assert "model.bogus" in r.stderr
    assert "Traceback" not in r.stderr
