"""engine: deepspeed against the native engine, on real gloo process groups (2 CPU ranks).

Parity: the same tiny DiffMoE (configs/tiny.yaml, ep=2: experts sharded, all-to-all dispatcher) is
trained for STEPS steps by the native Trainer and by DeepSpeedTrainer at ZeRO 1 and ZeRO 2 in fp32,
with gradient clipping active (grad_clip below the measured norm). Per-step losses (mean over ranks)
must agree to rtol 1e-4: both engines compute the same fp32 math, only the order of floating-point
reductions differs (flattened buckets, reduce-scatter vs all-reduce), which moves the loss by about
1e-6 relative per step on this model; 1e-4 leaves room for that to grow over a few steps and is still
far below the step-to-step change of the loss (about 1e-2), so a wrongly scaled or unreduced expert
gradient fails.

Resume: 2 steps + checkpoint + a fresh DeepSpeedTrainer on the same run dir + 2 steps equals 4
uninterrupted steps (losses, EMA weights, thresholds), ZeRO 2, bf16; the save's all-reduces counted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import run_distributed  # noqa: E402

from diffmoe_dist.config import load_config  # noqa: E402
from diffmoe_dist.trainer.deepspeed_config import build_deepspeed_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS = 4
RTOL = 1e-4
EP = int(os.environ.get("DIFFMOE_TEST_DS_EP", "2"))


def _cfg(run_dir: str, *extra: str):
    return load_config(
        TINY,
        [
            f"run.dir={run_dir}",
            f"train.steps={STEPS}",
            f"parallel.ep={EP}",
            "parallel.backend=gloo",
            "train.ckpt_every=1000",
            "train.grad_clip=0.05",
            *extra,
        ],
    )


def _losses(trainer, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        r = trainer.train_step()
        out.append(trainer._reduced({"loss": r["loss"], "grad_norm": r["grad_norm"]}))
    return out


def _dist_info(rank: int, world_size: int):
    from diffmoe_dist.parallel.distributed import DistInfo

    return DistInfo(rank, world_size, 0, torch.device("cpu"), "gloo")


def _parity(rank: int, world_size: int, tmp: str) -> dict:
    from diffmoe_dist.trainer.deepspeed_engine import DeepSpeedTrainer
    from diffmoe_dist.trainer.trainer import Trainer

    di = _dist_info(rank, world_size)
    res = {"native": _losses(Trainer(_cfg(f"{tmp}/native"), di), STEPS)}
    for z in (1, 2):
        cfg = _cfg(f"{tmp}/ds{z}", "engine=deepspeed", f"deepspeed.zero_stage={z}")
        tr = DeepSpeedTrainer(cfg, di)
        n_expert = sum(1 for p in tr.model.parameters() if getattr(p, "allreduce", True) is False)
        res[f"zero{z}"] = _losses(tr, STEPS)
        res[f"zero{z}_moe_groups"] = sum(tr.engine.optimizer.is_moe_param_group)
        res[f"zero{z}_n_expert"] = n_expert
    return res


@pytest.mark.timeout(300)
def test_deepspeed_zero1_zero2_match_native(tmp_path: Path) -> None:
    results = run_distributed(_parity, 2, args=(str(tmp_path),), timeout_s=280, pg_timeout_s=60)
    r = results[0]
    native = [s["loss"] for s in r["native"]]
    assert r["native"][0]["grad_norm"] > 0.05, "clipping must be active for the test to cover it"
    for z in (1, 2):
        assert r[f"zero{z}_moe_groups"] >= 1 and r[f"zero{z}_n_expert"] > 0
        ds = [s["loss"] for s in r[f"zero{z}"]]
        print(f"ep={EP} native {native}\n      zero{z}  {ds}")
        assert ds == pytest.approx(native, rel=RTOL), (z, native, ds)
        gn_native = [s["grad_norm"] for s in r["native"]]
        gn_ds = [s["grad_norm"] for s in r[f"zero{z}"]]
        assert gn_ds == pytest.approx(gn_native, rel=1e-3), (z, gn_native, gn_ds)


def _resume(rank: int, world_size: int, tmp: str) -> dict:
    from diffmoe_dist.trainer.deepspeed_engine import DeepSpeedTrainer

    di = _dist_info(rank, world_size)
    extra = ("engine=deepspeed", "deepspeed.zero_stage=2", "train.precision=bf16")
    full = DeepSpeedTrainer(_cfg(f"{tmp}/full", *extra), di)
    ref = _losses(full, STEPS)
    a = DeepSpeedTrainer(_cfg(f"{tmp}/split", *extra), di)
    first = _losses(a, 2)
    # Every all-reduce of the save (DeepSpeed's and ours end in torch.distributed.all_reduce).
    calls = []
    real = torch.distributed.all_reduce

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*args, **kwargs)

    torch.distributed.all_reduce = counting
    try:
        a.save()
    finally:
        torch.distributed.all_reduce = real
    n_params = sum(1 for p in a.model.parameters() if p.requires_grad)
    # what was saved equals DeepSpeed's own per-parameter gathers, bit for bit
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    gathered_exact = True
    for name, p in a.model.named_parameters():
        if not p.requires_grad:  # frozen (pos_embed): no optimizer state, not gathered
            continue
        saved = a.checkpoint_optimizer()._full[name]
        ref_t = {"param": safe_get_full_fp32_param(p)}
        ref_t.update({k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")})
        for k, v in ref_t.items():
            gathered_exact &= torch.equal(saved[k], v.reshape(p.shape).float())
    a.close()  # one trainer per run directory: the first gives it back (as its process exit would)
    b = DeepSpeedTrainer(_cfg(f"{tmp}/split", *extra), di)
    assert b.step == 2
    second = _losses(b, STEPS - 2)
    ema_diff = max(
        (pf - pb).abs().max().item()
        for pf, pb in zip(full.ema.state_dict().values(), b.ema.state_dict().values())
    )
    thr = [m.thresholds.tolist() for m in b.model.moe_layers()]
    thr_ref = [m.thresholds.tolist() for m in full.model.moe_layers()]
    return {
        "ref": ref,
        "resumed": first + second,
        "ema_diff": ema_diff,
        "thr": (thr, thr_ref),
        "save_all_reduces": len(calls),
        "gathered_exact": gathered_exact,
        "n_params": n_params,
    }


@pytest.mark.timeout(300)
def test_deepspeed_resume_matches_uninterrupted(tmp_path: Path) -> None:
    r = run_distributed(_resume, 2, args=(str(tmp_path),), timeout_s=280, pg_timeout_s=60)[0]
    # The ZeRO state is gathered with one all-reduce per data-parallel group of more than one rank
    # (here the world; the edp group of ep=2 on 2 ranks is one rank), not 3 per parameter.
    print(f"all-reduces in one save: {r['save_all_reduces']} ({r['n_params']} parameters)")
    assert r["save_all_reduces"] <= 2, (r["save_all_reduces"], r["n_params"])
    assert r["gathered_exact"]
    ref = [s["loss"] for s in r["ref"]]
    got = [s["loss"] for s in r["resumed"]]
    assert got == pytest.approx(ref, rel=1e-6), (ref, got)
    assert r["ema_diff"] == 0.0
    assert r["thr"][0] == r["thr"][1]
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert "step-00000002" in ckpts, ckpts  # the project's format, whatever the engine
    assert not (tmp_path / "split" / "ds_checkpoints").exists()


# ----------------------------------------------------------------------------------------------------
# the generated config and bad input (no processes needed)


def test_generated_config_follows_ours() -> None:
    cfg = _cfg("/tmp/x", "engine=deepspeed", "deepspeed.zero_stage=2", "train.precision=bf16")
    ds = build_deepspeed_config(cfg, world_size=2, cuda=False)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == 0.05 and ds["optimizer"]["params"]["lr"] == cfg.train.lr
    assert ds["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("prebuilt", [False, True])
def test_apex_on_cuda_without_prebuilt_fused_adam_uses_torch_fused(
    monkeypatch: pytest.MonkeyPatch, prebuilt: bool
) -> None:
    # cuda=True is injected (no GPU here); whether DeepSpeed's fused_adam op was prebuilt is too.
    import diffmoe_dist.trainer.deepspeed_config as dse

    monkeypatch.setattr(dse, "_ds_fused_adam_prebuilt", lambda: prebuilt)
    cfg = _cfg("/tmp/x", "engine=deepspeed", "train.optimizer_impl=apex")
    params = build_deepspeed_config(cfg, world_size=2, cuda=True)["optimizer"]["params"]
    if prebuilt:  # DeepSpeed's FusedAdam, nothing to compile
        assert params["torch_adam"] is False and "fused" not in params
    else:  # no JIT build (it needs nvcc): torch.optim.AdamW(fused=True)
        assert params["torch_adam"] is True and params["fused"] is True


def _with_json(tmp_path: Path, obj: dict, *extra: str):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(obj))
    return _cfg(str(tmp_path / "run"), "engine=deepspeed", f"deepspeed.config_json={p}", *extra)


def test_user_json_merges_extra_keys_and_auto(tmp_path: Path) -> None:
    cfg = _with_json(
        tmp_path,
        {"train_batch_size": "auto", "zero_optimization": {"allgather_bucket_size": 12345}},
    )
    ds = build_deepspeed_config(cfg, world_size=2, cuda=False)
    assert ds["train_batch_size"] == 16
    assert ds["zero_optimization"] == {
        "stage": 1,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "allgather_bucket_size": 12345,
    }


@pytest.mark.parametrize(
    ("obj", "extra", "match"),
    [
        (
            {"train_batch_size": 64},
            (),
            r"'train_batch_size'=64 contradicts train.global_batch_size",
        ),
        (
            {"train_micro_batch_size_per_gpu": 4},
            (),
            r"'train_micro_batch_size_per_gpu'=4 contradicts",
        ),
        ({"bf16": {"enabled": True}}, (), r"'bf16.enabled'=True contradicts train.precision"),
        ({"fp16": {"enabled": True}}, (), r"fp16.enabled=true is refused \(on CPU"),
        ({"zero_optimization": {"stage": 3}}, (), r"zero_optimization.stage=3 conflicts"),
        ({"zero_optimization": {"stage": 2}}, (), r"'zero_optimization.stage'=2 contradicts"),
        ({"gradient_clipping": 1.0}, (), r"'gradient_clipping'=1.0 contradicts train.grad_clip"),
        ({"optimizer": {"params": {"lr": 0.1}}}, (), r"'optimizer.params.lr'=0.1 contradicts"),
    ],
)
def test_user_json_contradictions_are_refused(
    tmp_path: Path, obj: dict, extra: tuple, match: str
) -> None:
    cfg = _with_json(tmp_path, obj, *extra)
    with pytest.raises(ValueError, match=match):
        build_deepspeed_config(cfg, world_size=2, cuda=False)


def test_zero3_and_fp16_in_our_config_are_refused() -> None:
    with pytest.raises(ValueError, match="deepspeed.zero_stage=3"):
        _cfg("/tmp/x", "engine=deepspeed", "deepspeed.zero_stage=3")
    with pytest.raises(ValueError, match="train.precision='fp16'"):
        _cfg("/tmp/x", "engine=deepspeed", "train.precision=fp16")


def test_zero0_bf16_is_refused_at_load() -> None:
    with pytest.raises(ValueError, match=r"deepspeed.zero_stage=0 with train.precision='bf16'"):
        _cfg("/tmp/x", "engine=deepspeed", "deepspeed.zero_stage=0", "train.precision=bf16")
    assert _cfg("/tmp/x", "engine=deepspeed", "deepspeed.zero_stage=0").deepspeed.zero_stage == 0
