"""One typed config tree, loaded from YAML with ``--set a.b=value`` overrides.

Every section is a dataclass; unknown keys, wrong types and impossible values raise ``ValueError``
naming the dotted key and the numbers involved, before any process-group work starts. The resolved
config (after presets and overrides) is what gets saved with every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The names each choice accepts are defined once, where the choice is implemented; this module
# imports them (and none of these modules imports config.py at run time).
from diffmoe_dist.models.moe import (
    EXPERT_CHOICE_MODES,
    INFER_RULES,
    PREDICTOR_RULES,
    ROUTING_MODES,
)
from diffmoe_dist.models.registry import preset
from diffmoe_dist.parallel.groups import GROUP_SOURCES
from diffmoe_dist.parallel.layout import check_experts, layout_from_config
from diffmoe_dist.parallel.numerics import SAMPLE_PRECISIONS
from diffmoe_dist.transport.cfg import POOL_MODES
from diffmoe_dist.transport.ddpm import DDPM_NUM_TIMESTEPS, DDPM_SAMPLERS
from diffmoe_dist.transport.objective import OBJECTIVES
from diffmoe_dist.transport.samplers import FLOW_SAMPLERS

# Choices whose implementing module reads the config itself are named here, and that module
# imports them (the import goes one way): data.verify (data/latents.py), moe.capacity_schedule
# (models/capacity_schedule.py), train.grad_reduce (parallel/grad_reduce.py).
LATENT_VERIFY_MODES = ("auto", "always", "never")
CAPACITY_SCHEDULES = ("none", "linear")
GRAD_REDUCE_MODES = ("overlap", "flat")


@dataclass
class ModelConfig:
    # A registry name (see models/registry.py) fills the architecture fields before the other keys of
    # this section apply, so `name: DiffMoE-S-E16` plus `input_size: 16` is a valid override.
    name: str = ""
    input_size: int = 32  # latent (or image) side, pixels of the model input
    in_channels: int = 4
    patch_size: int = 2
    depth: int = 12
    hidden_size: int = 384
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    norm_impl: str = "torch"  # torch | apex (fused LayerNorm where NVIDIA apex is importable)


@dataclass
class MoEConfig:
    mode: str = "diffmoe"  # dense | tc | ec | diffmoe
    num_experts: int = 16
    capacity: float = 1.0  # training capacity C: k = floor(S * C / E)
    # none | linear: capacity E (every expert takes every token) up to step stage1_steps, then a
    # linear decay to `capacity` at step stage2_steps (public DiffMoE code; models/capacity_schedule.py)
    capacity_schedule: str = "none"
    stage1_steps: int = 0
    stage2_steps: int = 0
    pool_samples: int = 64  # samples per routing pool (diffmoe); part of the model, see DESIGN.md
    predictor: bool = True  # capacity predictor (diffmoe only)
    cp_loss_weight: float = 1.0
    threshold_decay: float = 0.95
    balance_loss_weight: float = 0.01  # Switch load-balancing loss (tc only)
    grouped_mm: bool = (
        True  # uneven expert counts via torch._grouped_mm where available, else a loop
    )
    # Inference rule used in eval mode (EMA model, sampling):
    #   static: top-k with capacity infer_capacity; dynamic: the paper's rule (predictor counts, router
    #   chooses) with learned thresholds; gamma: dynamic with one global threshold `gamma`;
    #   independent: token -> expert e iff its own predictor probability > threshold_e (batch-independent).
    # The DiffMoE configs and the demo set `dynamic` (the paper's headline); `static` stays the default
    # here because TC / EC / Dense have no predictor.
    infer_mode: str = "static"
    infer_capacity: float = 1.0
    gamma: float = 0.4


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 256
    seed: int = 0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    grad_clip: float = 0.0  # 0 disables clipping
    precision: str = (
        "fp32"  # fp32 | bf16 (autocast); fp16 is refused (never on CPU, not needed on GPU)
    )
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    # Write a checkpoint at the end of the run (false: throughput runs that need none; about 32 GB
    # written and hashed for DiffMoE-L-E16).
    save_final: bool = True
    optimizer_impl: str = "torch"  # torch | apex (FusedAdam where importable)
    allow_pool_change: bool = False  # resume with a different moe.pool_samples only when True
    # Non-finite loss or gradient norm (agreed over all ranks, before the optimizer step):
    # stop = exit non-zero naming the step and loss, nothing saved after the last finite checkpoint;
    # skip_step = drop that step's update (native engine), stop after nonfinite_max_skips in a row.
    nonfinite: str = "stop"
    nonfinite_max_skips: int = 10
    # Every checkpoint in run.dir unreadable: start from step 0 anyway only when True (else refuse).
    allow_restart: bool = False
    tf32: bool = True  # TF32 for fp32 matmuls on CUDA (diffmoe_dist/parallel/numerics.py)
    # Deterministic CUDA kernels (torch.use_deterministic_algorithms + CUBLAS_WORKSPACE_CONFIG) for
    # reproducibility runs; slower. docs/gpu.md states the GPU tolerance.
    deterministic: bool = False
    # Peak FLOP/s per rank, in TFLOP/s, for the `mfu` metric; 0 = the bf16 peak of a known GPU
    # (H100 / H200 / A100, diffmoe_dist/models/flops.py) when training in bf16 on it, else no `mfu`.
    peak_tflops: float = 0.0
    # The step at scale (issue 15, parallel/grad_reduce.py GradReducer): gradient reduction
    # "overlap" (DDP buckets + async expert buckets during backward) | "flat" (after backward);
    # its wire dtype fp32 | bf16 (the sum lands in the fp32 grads); DDP / expert bucket size in MiB.
    grad_reduce: str = "overlap"
    grad_reduce_dtype: str = "fp32"
    grad_bucket_mb: float = 25.0
    # Micro-batches per optimizer step: the global batch is cut into this many consecutive parts
    # (each whole pools), gradients accumulate locally and are reduced once per step.
    grad_accum_steps: int = 1
    fused_adamw: bool = True  # torch AdamW fused (CPU / CUDA) where available, else foreach
    activation_checkpointing: str = "none"  # none | blocks (recompute each DiT block in backward)
    # torch.compile per DiT block (parallel/parallelize.py apply_compile): dense blocks whole, the
    # attention half of MoE blocks; routing and the dispatcher's collectives stay eager.
    compile: bool = False


@dataclass
class DataConfig:
    name: str = "digits"  # digits | latents
    path: str = ""  # latents: directory with manifest.json
    image_size: int = 16  # digits are resized to this side
    hflip: bool = False  # paper: hflip on ImageNet; digits are not mirror symmetric
    # latents: when shard sha256 checksums are checked. auto: all at start-up for a set of at most
    # 4 GiB, else each shard on first read; always: all at start-up; never: sizes and headers only.
    verify: str = "auto"
    # the next step's batch (dataset read + per-sample draws) is prepared on a background thread
    # while the current step runs; same batches in the same order either way
    prefetch: bool = True


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel degree
    groups: str = "torch"  # torch | deepspeed | megatron
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    timeout_s: int = 300  # process-group timeout: a hung collective fails instead of hanging
    # How long the other ranks wait for rank 0 to hash and publish a checkpoint (not a collective,
    # so parallel.timeout_s does not bound it; parallel/distributed.py run_on_rank0).
    ckpt_timeout_s: int = 3600
    dedup_tokens: bool = False  # send a token once per destination rank, not once per expert


@dataclass
class RunConfig:
    dir: str = "runs/default"
    wandb: bool = False
    wandb_project: str = "diffmoe-dist"
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class SampleConfig:
    sampler: str = "euler"  # flow: euler | heun | dopri5 | sde; ddpm: ddpm (ancestral) | ddim
    num_steps: int = 250  # ddpm: the 1000 training steps respaced to this many (<= 1000)
    cfg_scale: float = 1.0
    # auto | joint | separate: how cond/uncond halves share a MoE pool; auto = the public code's
    # choice per objective (separate under flow, joint under ddpm), see transport/cfg.py
    cfg_pool: str = "auto"
    num_samples: int = 64
    batch_size: int = 64  # per rank
    seed: int = 0
    use_ema: bool = True
    # auto (bf16 on CUDA, fp32 on CPU) | bf16 (autocast) | tf32 | fp32 (diffmoe_dist/parallel/numerics.py)
    precision: str = "auto"


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    config_json: str = ""  # optional user JSON merged into the generated config


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # flow (rectified flow, transport/path.py) | ddpm (DiT's DDPM: eps + learned variance, hybrid
    # loss, transport/ddpm.py; the model then outputs 2 x in_channels)
    objective: str = "flow"
    engine: str = "native"  # native | deepspeed
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def validate(self) -> Config:
        validate(self)
        return self


# ----------------------------------------------------------------------------------------------------
# loading


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML value to the dataclass field type, or raise naming the key."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(
                f"config key '{key}': expected a list of {len(args)} numbers, got {value!r}"
            )
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key '{key}': expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads "1e-4" (no dot) as a string; accept any float literal.
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"config key '{key}': expected a number, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key '{key}': expected a number, got {value!r}")
        else:
            number = float(value)
        # No key means nan or inf (`.nan`, `.inf` in YAML): refused here, not by torch mid-run.
        if not math.isfinite(number):
            raise ValueError(f"config key '{key}' = {value!r}; must be a finite number")
        return number
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {typ} for {key}")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ValueError(
            f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}"
        )
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ValueError(
                f"unknown config key '{full}' (valid here: {', '.join(sorted(names))})"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=x"]`` -> nested dict; values parsed as YAML scalars (``true``, ``1e-4``, ``[1,2]``)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as e:
            raise ValueError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
        if isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: '{p}' is set both as a value and a section")
        node[parts[-1]] = value
    return tree


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    data = data or {}
    # A registry name (model.name) lies under the given keys, so every other key (model.*, moe.*)
    # overrides it.
    name = data.get("model", {}).get("name") if isinstance(data.get("model"), dict) else None
    if name:
        data = merge_dicts(preset(str(name)), data)
    _apply(cfg, data)
    return cfg


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML), apply ``--set`` overrides, validate. ``path=None`` starts from defaults."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file '{p}' is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config file '{p}' must hold a mapping at the top level")
    data = merge_dicts(data, parse_overrides(overrides or []))
    return from_dict(data).validate()


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically (temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, p)


def config_hash_fields(cfg: Config) -> dict[str, Any]:
    """The fields that define the model's architecture; a checkpoint from another model is refused."""
    m = cfg.model
    return {
        "input_size": m.input_size,
        "in_channels": m.in_channels,
        "patch_size": m.patch_size,
        "depth": m.depth,
        "hidden_size": m.hidden_size,
        "num_heads": m.num_heads,
        "mlp_ratio": m.mlp_ratio,
        "num_classes": m.num_classes,
        "moe_mode": cfg.moe.mode,
        "num_experts": cfg.moe.num_experts if cfg.moe.mode != "dense" else 0,
        "predictor": bool(cfg.moe.predictor and cfg.moe.mode == "diffmoe"),
        # Only when not the default, so checkpoints written before the key existed still match.
        **({"objective": cfg.objective} if cfg.objective != "flow" else {}),
    }


# ----------------------------------------------------------------------------------------------------
# validation


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ValueError(f"config key '{key}' = {value!r}; expected one of {', '.join(options)}")


def _positive(value: float, key: str, strict: bool = True) -> None:
    if (value <= 0) if strict else (value < 0):
        raise ValueError(f"config key '{key}' = {value}; must be {'> 0' if strict else '>= 0'}")


def validate(cfg: Config) -> None:
    m, moe, t = cfg.model, cfg.moe, cfg.train
    for key in (
        "input_size",
        "in_channels",
        "patch_size",
        "depth",
        "hidden_size",
        "num_heads",
        "num_classes",
    ):
        _positive(getattr(m, key), f"model.{key}")
    if m.input_size % m.patch_size:
        raise ValueError(
            f"model.input_size={m.input_size} is not divisible by model.patch_size={m.patch_size}"
        )
    if m.hidden_size % m.num_heads:
        raise ValueError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}"
        )
    if not 0.0 <= m.class_dropout_prob < 1.0:
        raise ValueError(f"model.class_dropout_prob={m.class_dropout_prob}; must be in [0, 1)")
    _choice(m.norm_impl, ("torch", "apex"), "model.norm_impl")
    _choice(moe.mode, ROUTING_MODES, "moe.mode")
    if moe.num_experts < 1:
        raise ValueError(f"moe.num_experts={moe.num_experts}; must be >= 1")
    _positive(moe.capacity, "moe.capacity")
    _positive(moe.infer_capacity, "moe.infer_capacity")
    _choice(moe.capacity_schedule, CAPACITY_SCHEDULES, "moe.capacity_schedule")
    if moe.capacity_schedule == "linear":
        if moe.mode not in EXPERT_CHOICE_MODES:
            raise ValueError(
                f"moe.capacity_schedule='linear' needs expert choice (moe.mode diffmoe or ec); "
                f"moe.mode={moe.mode!r} has no training capacity"
            )
        if not 0 <= moe.stage1_steps < moe.stage2_steps:
            raise ValueError(
                f"moe.capacity_schedule='linear' needs 0 <= moe.stage1_steps < moe.stage2_steps; got "
                f"moe.stage1_steps={moe.stage1_steps}, moe.stage2_steps={moe.stage2_steps} (capacity "
                f"E={moe.num_experts} up to stage 1, then linear to moe.capacity={moe.capacity} at stage 2)"
            )
    if moe.pool_samples < 1:
        raise ValueError(f"moe.pool_samples={moe.pool_samples}; must be >= 1")
    _choice(moe.infer_mode, INFER_RULES, "moe.infer_mode")
    if not 0.0 <= moe.threshold_decay < 1.0:
        raise ValueError(f"moe.threshold_decay={moe.threshold_decay}; must be in [0, 1)")
    if not 0.0 < moe.gamma < 1.0:
        raise ValueError(f"moe.gamma={moe.gamma}; must be a probability in (0, 1)")
    _positive(moe.cp_loss_weight, "moe.cp_loss_weight", strict=False)
    _positive(moe.balance_loss_weight, "moe.balance_loss_weight", strict=False)
    if moe.infer_mode in PREDICTOR_RULES and not (moe.mode == "diffmoe" and moe.predictor):
        raise ValueError(
            f"moe.infer_mode={moe.infer_mode!r} needs the capacity predictor "
            f"(moe.mode='diffmoe' and moe.predictor=true; got mode={moe.mode!r}, predictor={moe.predictor})"
        )
    for key in ("steps", "global_batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
        _positive(getattr(t, key), f"train.{key}")
    _positive(t.lr, "train.lr")
    _positive(t.warmup_steps, "train.warmup_steps", strict=False)
    _positive(t.grad_clip, "train.grad_clip", strict=False)
    _positive(t.peak_tflops, "train.peak_tflops", strict=False)
    if not 0.0 <= t.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay={t.ema_decay}; must be in [0, 1)")
    if t.precision == "fp16":
        raise ValueError(
            "train.precision='fp16' is not supported (fp16 is unreliable on CPU and needs loss scaling); "
            "use 'bf16' or 'fp32'"
        )
    _choice(t.precision, ("fp32", "bf16"), "train.precision")
    _choice(t.optimizer_impl, ("torch", "apex"), "train.optimizer_impl")
    _choice(t.grad_reduce, GRAD_REDUCE_MODES, "train.grad_reduce")
    _choice(t.grad_reduce_dtype, ("fp32", "bf16"), "train.grad_reduce_dtype")
    _positive(t.grad_bucket_mb, "train.grad_bucket_mb")
    _positive(t.grad_accum_steps, "train.grad_accum_steps")
    _choice(t.activation_checkpointing, ("none", "blocks"), "train.activation_checkpointing")
    if t.grad_accum_steps > 1 and cfg.engine != "native":
        raise ValueError(
            f"train.grad_accum_steps={t.grad_accum_steps} needs engine='native' (got {cfg.engine!r}; "
            "DeepSpeed has its own gradient_accumulation_steps)"
        )
    if t.grad_reduce == "flat" and t.grad_reduce_dtype != "fp32":
        raise ValueError(
            f"train.grad_reduce_dtype={t.grad_reduce_dtype!r} needs train.grad_reduce='overlap' "
            "(the flat path reduces in the gradients' own dtype)"
        )
    _choice(t.nonfinite, ("stop", "skip_step"), "train.nonfinite")
    _positive(t.nonfinite_max_skips, "train.nonfinite_max_skips")
    if t.nonfinite == "skip_step" and cfg.engine == "deepspeed":
        raise ValueError(
            "train.nonfinite='skip_step' needs engine=native (the DeepSpeed engine steps inside "
            "engine.step()); use train.nonfinite='stop'"
        )
    _choice(cfg.data.name, ("digits", "latents"), "data.name")
    _choice(cfg.data.verify, LATENT_VERIFY_MODES, "data.verify")
    if not cfg.run.dir.strip():
        raise ValueError(
            "run.dir is empty: name the run directory (e.g. --set run.dir=runs/my-run); "
            "use run.dir=. to mean the current directory"
        )
    if cfg.data.name == "latents" and not cfg.data.path:
        raise ValueError("data.path must name a latent-shard directory when data.name='latents'")
    p = cfg.parallel
    if p.ep < 1:
        raise ValueError(f"parallel.ep={p.ep}; must be >= 1")
    check_experts(p.ep, moe.num_experts if moe.mode != "dense" else 0)
    _choice(p.groups, GROUP_SOURCES, "parallel.groups")
    _choice(p.backend, ("auto", "gloo", "nccl"), "parallel.backend")
    _positive(p.timeout_s, "parallel.timeout_s")
    _positive(p.ckpt_timeout_s, "parallel.ckpt_timeout_s")
    s = cfg.sample
    _choice(s.sampler, FLOW_SAMPLERS + DDPM_SAMPLERS, "sample.sampler")
    _choice(s.cfg_pool, ("auto", *POOL_MODES), "sample.cfg_pool")
    _choice(s.precision, SAMPLE_PRECISIONS, "sample.precision")
    for key in ("num_steps", "num_samples", "batch_size"):
        _positive(getattr(s, key), f"sample.{key}")
    _choice(cfg.objective, OBJECTIVES, "objective")
    _validate_objective(cfg)
    _choice(cfg.engine, ("native", "deepspeed"), "engine")
    if cfg.engine == "deepspeed" and cfg.deepspeed.zero_stage == 0 and t.precision == "bf16":
        raise ValueError(
            "deepspeed.zero_stage=0 with train.precision='bf16': DeepSpeed's stage-0 bf16 optimizer "
            "does not handle expert parameter groups; use deepspeed.zero_stage=1 or 2"
        )
    if cfg.deepspeed.zero_stage not in (0, 1, 2):
        raise ValueError(
            f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}; supported: 0, 1, 2 "
            "(ZeRO-3 partitions expert parameters across the expert-parallel group, which the MoE layer "
            "does not support)"
        )


def _validate_objective(cfg: Config) -> None:
    """The sampler must belong to the objective; a DDPM respacing must fit its training steps."""
    s = cfg.sample
    allowed = DDPM_SAMPLERS if cfg.objective == "ddpm" else FLOW_SAMPLERS
    if s.sampler not in allowed:
        raise ValueError(
            f"sample.sampler={s.sampler!r} does not exist for objective={cfg.objective!r}; "
            f"choose one of {', '.join(allowed)}"
            + (" (dopri5 and sde integrate the flow ODE/SDE)" if cfg.objective == "ddpm" else "")
        )
    if cfg.objective == "ddpm" and s.num_steps > DDPM_NUM_TIMESTEPS:
        raise ValueError(
            f"sample.num_steps={s.num_steps} cannot respace the {DDPM_NUM_TIMESTEPS} DDPM training "
            f"steps (objective='ddpm' needs 1 <= sample.num_steps <= {DDPM_NUM_TIMESTEPS})"
        )


def validate_layout(cfg: Config, world_size: int) -> dict[str, int]:
    """The layout's numbers (world_size, ep, dp, micro_batch, pool_span) as a dict; ValueError with
    every number when it cannot be laid out. The checks live in parallel/layout.py (their one home)."""
    lay = layout_from_config(cfg, world_size)
    return {
        "world_size": lay.world_size,
        "ep": lay.ep,
        "dp": lay.dp,
        "micro_batch": lay.micro_batch,
        "pool_span": lay.pool_span,
    }
