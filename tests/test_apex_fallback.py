"""NVIDIA apex is optional: model.norm_impl=apex / train.optimizer_impl=apex fall back to torch.

Fallback (apex absent, e.g. this CPU image: apex is not on PyPI, and the PyPI package named apex is
unrelated): the torch path runs, says so once in the log, and is numerically the torch model (exact:
it *is* torch.nn.LayerNorm / torch.optim.AdamW). The apex path is exercised only where apex and
CUDA exist (the GPU Docker image); there fused kernels may round differently, so it is compared with
the torch path at 1e-5 (LayerNorm) / 1e-6 (one Adam step).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import pytest
import torch

import diffmoe_dist.models.blocks as blocks
from diffmoe_dist.config import load_config
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.trainer.optim import build_optimizer

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
HAVE_APEX = (
    importlib.util.find_spec("apex") is not None
    and importlib.util.find_spec("apex.normalization") is not None
)
APEX_SKIP = (
    "NVIDIA apex is not importable here (it is not on PyPI; only the GPU Docker image builds it), "
    "so only the torch fallback is tested"
)


def _model(norm_impl: str) -> DiffMoE:
    cfg = load_config(TINY, [f"model.norm_impl={norm_impl}"])
    torch.manual_seed(0)
    return DiffMoE(cfg.model, cfg.moe)


def _out(model: DiffMoE) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 16, 16, generator=g)
    t = torch.rand(4, generator=g)
    y = torch.tensor([0, 1, 2, 10])
    return model.eval()(x, t, y)


@pytest.mark.skipif(HAVE_APEX, reason="apex is installed: the fallback does not run here")
def test_layernorm_fallback_warns_once_and_matches_torch(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blocks, "_APEX_REPORTED", False)
    with caplog.at_level(logging.WARNING, logger="diffmoe_dist.models.blocks"):
        apex_model = _model("apex")  # 2 blocks x 2 norms + the final norm: five LayerNorms
        _model("apex")  # a second model (the EMA copy in the trainer) stays quiet too
    msgs = [r.getMessage() for r in caplog.records if "norm_impl=apex" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert "using torch LayerNorm" in msgs[0]
    torch_model = _model("torch")
    assert all(
        type(m) is torch.nn.LayerNorm
        for m in apex_model.modules()
        if "norm" in type(m).__name__.lower()
    )
    for (ka, va), (kt, vt) in zip(
        apex_model.state_dict().items(), torch_model.state_dict().items()
    ):
        assert ka == kt and torch.equal(va, vt)
    assert torch.equal(_out(apex_model), _out(torch_model))


@pytest.mark.skipif(HAVE_APEX and torch.cuda.is_available(), reason="apex FusedAdam usable here")
def test_fused_adam_fallback_warns_once_and_steps_like_adamw(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg_apex = load_config(TINY, ["train.optimizer_impl=apex"]).train
    cfg_torch = load_config(TINY, []).train
    m_apex, m_torch = _model("torch"), _model("torch")
    with caplog.at_level(logging.WARNING, logger="diffmoe_dist.trainer.optim"):
        opt_apex = build_optimizer(m_apex, cfg_apex)
    msgs = [r.getMessage() for r in caplog.records if "optimizer_impl=apex" in r.getMessage()]
    assert len(msgs) == 1 and "using torch AdamW" in msgs[0], msgs
    assert type(opt_apex) is torch.optim.AdamW
    opt_torch = build_optimizer(m_torch, cfg_torch)
    for m, opt in ((m_apex, opt_apex), (m_torch, opt_torch)):
        m.train()
        _out(m.train()).square().mean().backward()
        opt.step()
    for pa, pt in zip(m_apex.parameters(), m_torch.parameters()):
        assert torch.equal(pa, pt)


@pytest.mark.skipif(not (HAVE_APEX and torch.cuda.is_available()), reason=APEX_SKIP)
def test_apex_path_matches_torch_on_gpu() -> None:  # pragma: no cover - GPU image only
    from apex.normalization import FusedLayerNorm
    from apex.optimizers import FusedAdam

    m = _model("apex")
    assert any(isinstance(x, FusedLayerNorm) for x in m.modules())
    ref = _model("torch")
    ref.load_state_dict(m.state_dict())
    dev = torch.device("cuda")
    m, ref = m.to(dev).eval(), ref.to(dev).eval()
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(4, 1, 16, 16, device=dev, generator=g)
    t = torch.rand(4, device=dev, generator=g)
    y = torch.tensor([0, 1, 2, 10], device=dev)
    torch.testing.assert_close(m(x, t, y), ref(x, t, y), rtol=1e-5, atol=1e-5)
    cfg = load_config(TINY, ["train.optimizer_impl=apex"]).train
    m2, r2 = copy.deepcopy(ref).train(), copy.deepcopy(ref).train()
    opt = build_optimizer(m2, cfg)
    assert isinstance(opt, FusedAdam)
    opt_ref = torch.optim.AdamW(
        r2.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    for model, o in ((m2, opt), (r2, opt_ref)):
        model(x, t, y).square().mean().backward()
        o.step()
    for pa, pb in zip(m2.parameters(), r2.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)


class _ApexLikeFusedAdam(torch.optim.Optimizer):
    """Stand-in for apex.optimizers.FusedAdam, which cannot exist here (not on PyPI, needs CUDA):
    AdamW math plus the two behaviours of the real one that broke the trainer (issue 18 item 3):
    ``zero_grad()`` takes no argument, and the step count lives in ``param_groups[i]["step"]``."""

    def __init__(self, params, lr, betas, weight_decay, adam_w_mode, set_grad_none=True, eps=1e-8):  # type: ignore[no-untyped-def]
        assert adam_w_mode
        super().__init__(
            params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "eps": eps}
        )
        self.set_grad_none = set_grad_none

    def zero_grad(self) -> None:  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    if self.set_grad_none:
                        p.grad = None
                    else:
                        p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for g in self.param_groups:
            g["step"] = t = g.get("step", 0) + 1
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                p.mul_(1 - g["lr"] * g["weight_decay"])
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(g["eps"])
                p.addcdiv_(m, denom, value=-g["lr"] / (1 - b1**t))


def test_apex_fused_adam_zero_grad_and_step_count_survive_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    from diffmoe_dist.checkpoint import CheckpointManager
    from diffmoe_dist.trainer.optim import zero_grad

    fake = types.ModuleType("apex.optimizers")
    fake.FusedAdam = _ApexLikeFusedAdam  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.optimizers", fake)
    cfg = load_config(TINY, ["train.optimizer_impl=apex", "train.lr=1e-2"])

    def build() -> tuple[DiffMoE, torch.optim.Optimizer]:
        m = _model("torch").train()
        with monkeypatch.context() as mp:
            mp.setattr(torch.cuda, "is_available", lambda: True)  # build_optimizer asks
            opt = build_optimizer(m, cfg.train)
        assert isinstance(opt, _ApexLikeFusedAdam)
        return m, opt

    def step(m: DiffMoE, opt: torch.optim.Optimizer) -> None:
        zero_grad(opt)  # the trainer's call: apex's zero_grad(set_to_none=...) is a TypeError
        _out(m.train()).square().mean().backward()
        opt.step()

    m, opt = build()
    for _ in range(3):
        step(m, opt)
    ckpt = CheckpointManager(tmp_path, cfg, 0, 1, None)
    ckpt.save(3, m, None, opt)
    m2, opt2 = build()
    ckpt.load(ckpt.latest_valid(), m2, None, opt2)
    assert [g["step"] for g in opt2.param_groups] == [3]  # bias correction continues at step 4
    step(m, opt)
    step(m2, opt2)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
