"""The DeepSpeed config of a run: generated from ours, a user JSON merged in, contradictions refused.

``build_deepspeed_config(cfg, world_size)`` is the only source of the JSON DeepSpeed sees; nobody
maintains a JSON beside the YAML. ``deepspeed.config_json`` may add keys (bucket sizes, comms logging)
and may repeat a key we generate only with the same value or ``"auto"`` (docs/deepspeed.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from diffmoe_dist.config import Config

log = logging.getLogger(__name__)
_NEVER = 1 << 30  # steps_per_print: our MetricsLogger logs, not DeepSpeed


def _ds_fused_adam_prebuilt() -> bool:
    """True when DeepSpeed's fused_adam op was compiled at install time (DS_BUILD_FUSED_ADAM=1)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get("fused_adam", False))


def _generated_config(cfg: Config, world_size: int, cuda: bool) -> dict[str, Any]:
    t = cfg.train
    if t.global_batch_size % world_size:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by the world size {world_size}"
        )
    # DeepSpeed's AdamW: torch.optim.AdamW (torch_adam) unless optimizer_impl=apex on CUDA, where
    # DeepSpeed's own fused multi-tensor Adam is the counterpart of apex FusedAdam, when its op is
    # prebuilt. Otherwise DeepSpeed would JIT-compile it at engine start, which needs nvcc (absent
    # from runtime-only images and DS_BUILD_OPS=0 installs): torch's fused AdamW instead.
    fused = t.optimizer_impl == "apex" and cuda and _ds_fused_adam_prebuilt()
    torch_fused = t.optimizer_impl == "apex" and cuda and not fused
    if t.optimizer_impl == "apex" and not cuda:
        log.warning("train.optimizer_impl=apex with engine=deepspeed on CPU; using torch AdamW")
    if torch_fused:
        log.warning(
            "train.optimizer_impl=apex: DeepSpeed's FusedAdam op is not prebuilt (it would need "
            "nvcc to build); using torch.optim.AdamW(fused=True)"
        )
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.global_batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": cfg.deepspeed.zero_stage,
            # DeepSpeed asserts both for MoE parameter groups under ZeRO 2.
            "contiguous_gradients": True,
            "reduce_scatter": True,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "torch_adam": not fused,
                "adam_w_mode": True,
                **({"fused": True} if torch_fused else {}),
            },
        },
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


# (dotted key in the DeepSpeed JSON, our config key that generates it)
_OWNED = (
    ("train_batch_size", "train.global_batch_size"),
    ("train_micro_batch_size_per_gpu", "train.global_batch_size / world size"),
    ("gradient_accumulation_steps", "(always 1: one optimizer step per global batch)"),
    ("gradient_clipping", "train.grad_clip"),
    ("bf16.enabled", "train.precision"),
    ("zero_optimization.stage", "deepspeed.zero_stage"),
    ("optimizer.type", "train.optimizer_impl"),
    ("optimizer.params.lr", "train.lr"),
    ("optimizer.params.betas", "train.betas"),
    ("optimizer.params.weight_decay", "train.weight_decay"),
)


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_user_config(
    user: dict[str, Any], generated: dict[str, Any], cuda: bool, src: str
) -> None:
    """Raise ValueError naming the key and both values where ``user`` contradicts our config.

    ``"auto"`` (the Hugging Face convention) means "take ours" and never conflicts.
    """
    if _get(user, "fp16.enabled") is True:
        where = "on CPU DeepSpeed has no fp16 path and " if not cuda else ""
        raise ValueError(
            f"{src}: fp16.enabled=true is refused ({where}train.precision="
            f"{'bf16' if generated['bf16']['enabled'] else 'fp32'}); use train.precision=bf16"
        )
    stage = _get(user, "zero_optimization.stage")
    if stage == 3:
        raise ValueError(
            f"{src}: zero_optimization.stage=3 conflicts with deepspeed.zero_stage="
            f"{generated['zero_optimization']['stage']}: ZeRO-3 would partition the expert parameters "
            "the MoE layer computes with; use stage 1 or 2"
        )
    for key, ours in _OWNED:
        theirs, mine = _get(user, key), _get(generated, key)
        if theirs is None or theirs == "auto":
            continue
        if isinstance(theirs, (list, tuple)) and isinstance(mine, (list, tuple)):
            same = [float(a) for a in theirs] == [float(b) for b in mine]
        elif isinstance(mine, str) or isinstance(theirs, str):
            same = str(theirs).lower() == str(mine).lower()
        else:
            same = theirs == mine
        if not same:
            raise ValueError(
                f"{src}: '{key}'={theirs!r} contradicts {ours} (which generates {mine!r}); "
                "remove the key from the JSON or change the config"
            )


def build_deepspeed_config(
    cfg: Config, world_size: int, cuda: bool | None = None
) -> dict[str, Any]:
    """The DeepSpeed config of a run: generated from ``cfg``, ``deepspeed.config_json`` merged in.

    The user JSON may add any key (bucket sizes, comms logging, ...); a key we generate may only be
    repeated with the same value or ``"auto"``. Returns a plain dict ready for DeepSpeedConfig.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    gen = _generated_config(cfg, world_size, cuda)
    path = cfg.deepspeed.config_json
    if not path:
        return gen
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"deepspeed.config_json='{p}' does not exist")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed.config_json='{p}' is not valid JSON: {e}") from e
    if not isinstance(user, dict):
        raise ValueError(f"deepspeed.config_json='{p}' must hold a JSON object")
    check_user_config(user, gen, cuda, f"deepspeed.config_json '{p}'")
    merged = _merge(gen, user)
    for key, _ in _OWNED:  # resolve "auto" to ours
        if _get(user, key) == "auto":
            *head, last = key.split(".")
            node = merged
            for h in head:
                node = node[h]
            node[last] = _get(gen, key)
    return merged
