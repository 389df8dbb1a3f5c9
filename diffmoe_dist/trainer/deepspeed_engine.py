"""``engine: deepspeed``: the same DiffMoE, MoE layer and dispatcher, stepped by a DeepSpeed engine.

What differs from the native Trainer (trainer/trainer.py), and only that, is overridden here:
    6. the DeepSpeed engine wraps the parallelized model; its config is generated from ours
       (build_deepspeed_config) with an optional user JSON merged in and checked for contradictions
    train_step: engine.backward + engine.step (ZeRO reduces dense grads over the world, expert grads
       over the expert-data-parallel group, clips, steps); the threshold all-reduce and the EMA stay
       post-step hooks exactly as in the native loop
    save / resume: engine.save_checkpoint (module + ZeRO shards) with our step / layout in
       client_state, plus one file per rank with that rank's model (its expert slice), EMA,
       thresholds and RNG; the engine's ``latest`` file is written last, so resume = load ``latest``

Expert parameters: parallelize_model marks them ``allreduce=False, group_name='ep_size_<ep>'`` as
DeepSpeed-MoE does. DeepSpeed only routes such parameters to the expert-data-parallel group when the
engine knows it has MoE layers, which it decides by ``isinstance(module, deepspeed.moe.layer.MoE)``;
our layer is not one (DeepSpeed's TopKGate is token choice and cannot express the pool), so
DiffMoEDeepSpeedEngine sets ``has_moe_layers`` for our MoELayer. Gradient scaling then matches the
native loop exactly: ZeRO divides every gradient by the data-parallel world size W and sums expert
gradients over the edp group (sum / W), as average_gradients does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from diffmoe_dist.config import Config, config_hash_fields
from diffmoe_dist.models.moe import MoELayer
from diffmoe_dist.parallel.distributed import DistInfo, barrier
from diffmoe_dist.parallel.groups import init_deepspeed_comm
from diffmoe_dist.parallel.parallelize import reduce_thresholds
from diffmoe_dist.trainer.optim import lr_at, set_lr
from diffmoe_dist.trainer.trainer import Trainer

log = logging.getLogger(__name__)
DS_CKPT_DIR = "ds_checkpoints"
TAG_PREFIX = "step-"
_NEVER = 1 << 30  # steps_per_print: our MetricsLogger logs, not DeepSpeed


# ----------------------------------------------------------------------------------------------------
# config: generated from ours, a user JSON merged in, contradictions refused


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


# ----------------------------------------------------------------------------------------------------
# the engine


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer) and m.mode != "dense"]


def build_engine(model: nn.Module, ds_config: dict[str, Any], ep: int, local_rank: int = 0) -> Any:
    """A DeepSpeed engine around ``model`` (already parallelized: expert params sliced and marked).

    Creates DeepSpeed's expert groups for ``ep`` (name ``ep_size_<ep>``, the name the parameters
    carry), then builds the engine the way ``deepspeed.initialize`` does, with the subclass below.
    """
    # DeepSpeed asserts LOCAL_RANK is set; our launchers resolve it (launch_env.py) but a plain
    # spawn (tests, notebooks) may not export it.
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    init_deepspeed_comm()
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups as ds_groups

    layers = _moe_layers(model)
    if layers:
        ds_groups._create_expert_and_data_parallel(ep)
        names = {getattr(p, "group_name", None) for m in layers for p in m.experts.parameters()}
        if names != {f"ep_size_{ep}"}:
            raise ValueError(
                f"expert parameters carry group names {sorted(map(str, names))}, expected "
                f"'ep_size_{ep}' (parallel.ep={ep}): call parallelize_model before build_engine"
            )

    class DiffMoEDeepSpeedEngine(DeepSpeedEngine):
        """DeepSpeedEngine that treats our MoELayer as an MoE layer (see the module docstring)."""

        def _configure_distributed_model(self, model: nn.Module) -> None:
            super()._configure_distributed_model(model)
            if layers:
                self.has_moe_layers = True
                self.num_experts = [m.num_experts for m in layers]

    params = [p for p in model.parameters() if p.requires_grad]
    # What deepspeed.initialize does for a non-pipeline model, with our engine class.
    engine = DiffMoEDeepSpeedEngine(
        args=None,
        model=model,
        model_parameters=params,
        config=ds_config,
        config_class=DeepSpeedConfig(ds_config),
        dist_init_required=False,
    )
    if layers and not engine.optimizer.has_moe_layers:
        raise RuntimeError("DeepSpeed's optimizer did not pick up the expert parameter groups")
    return engine


# ----------------------------------------------------------------------------------------------------


class DeepSpeedTrainer(Trainer):
    """The native Trainer with stage 6 (the engine), train_step, save and resume replaced."""

    engine: Any = None

    def __init__(self, cfg: Config, dist_info: DistInfo | None = None):
        if cfg.deepspeed.zero_stage not in (0, 1, 2):
            raise ValueError(
                f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}; supported: 0, 1, 2 (ZeRO-3 would "
                "partition expert parameters across the expert-parallel group)"
            )
        # 1-5: distributed, data, model + EMA (parallelized), native optimizer (replaced below),
        #      checkpoint manager, metrics; _resume is deferred until the engine exists
        super().__init__(cfg, dist_info)
        # 6. the DeepSpeed engine around the parallelized model, then resume from its checkpoints
        self.ds_config = build_deepspeed_config(cfg, self.world_size, self.device.type == "cuda")
        self.engine = build_engine(self.model, self.ds_config, self.ps.ep, self.dist.local_rank)
        self.optimizer = self.engine.optimizer
        self.ds_dir = self.run_dir / DS_CKPT_DIR
        self._resume()

    # ------------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        step, cfg = self.step, self.cfg.train
        t0 = time.perf_counter()
        x1, x0, t, y = self.local_batch(step)
        lr = lr_at(step, cfg)
        set_lr(self.engine.optimizer, lr)
        self.apply_capacity_schedule(step)
        losses = self.forward_loss(
            x1, x0, t, y
        )  # the module itself: ZeRO 1/2 need no forward hooks
        self.engine.backward(losses["loss"])  # reduction: dense over world, experts over edp
        self.engine.step()  # clip (gradient_clipping), optimizer step, zero grads
        grad_norm = self.engine.get_global_grad_norm()
        reduce_thresholds(self.model, self.ps)  # post-step hook, as in the native loop
        self._update_ema(cfg.ema_decay)
        self.step += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        gn = float(grad_norm) if grad_norm is not None else float("nan")
        # train.nonfinite (stop; skip_step is refused for this engine): the engine already stepped
        self._nonfinite_step(float(losses["loss"].detach()), 0.0 if grad_norm is None else gn, True)
        out.update(lr=lr, grad_norm=gn, step_time=time.perf_counter() - t0)
        return out

    @torch.no_grad()
    def _update_ema(self, decay: float) -> None:
        """update_ema, tolerating bf16 module weights (DeepSpeed bf16) next to the fp32 EMA."""
        for (n_e, p_e), (n_m, p_m) in zip(
            self.ema.named_parameters(), self.model.named_parameters()
        ):
            assert n_e == n_m, (n_e, n_m)
            if p_m.requires_grad:
                p_e.lerp_(p_m.detach().to(p_e.dtype), 1.0 - decay)
        for b_e, b_m in zip(self.ema.buffers(), self.model.buffers()):
            b_e.copy_(b_m)

    # ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _plain_checkpoint_path(self) -> Iterator[None]:
        # DeepSpeed's MoE checkpoint path only knows deepspeed.moe.layer.MoE modules; ours are saved
        # per rank below, so the module / ZeRO files go through the plain path.
        had = self.engine.has_moe_layers
        self.engine.has_moe_layers = False
        try:
            yield
        finally:
            self.engine.has_moe_layers = had

    def _meta(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "layout": {"world_size": self.world_size, "ep": self.ps.ep},
            "pool_samples": self.cfg.moe.pool_samples,
            "model_fields": config_hash_fields(self.cfg),
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "precision": self.cfg.train.precision,
        }

    def save(self) -> Path:
        tag = f"{TAG_PREFIX}{self.step:08d}"
        tag_dir = self.ds_dir / tag
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
            tag_dir.mkdir(parents=True)
        self._barrier()
        extra = {
            "step": self.step,
            "model": self.model.state_dict(),  # this rank's expert slice, thresholds included
            "ema": self.ema.state_dict(),
            "rng": torch.get_rng_state(),
        }
        tmp = tag_dir / f".diffmoe_rank{self.rank:05d}.pt.tmp"
        torch.save(extra, tmp)
        tmp.replace(tag_dir / f"diffmoe_rank{self.rank:05d}.pt")
        self._barrier()
        with self._plain_checkpoint_path():
            # writes <ds_dir>/latest last, so an interrupted save is never resumed from
            self.engine.save_checkpoint(
                str(self.ds_dir), tag=tag, client_state={"diffmoe": self._meta()}, save_latest=True
            )
        if self.rank == 0:
            tags = sorted(p for p in self.ds_dir.glob(f"{TAG_PREFIX}*") if p.is_dir())
            for old in tags[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        self._last_saved = self.step
        return tag_dir

    def _barrier(self) -> None:
        barrier(self.ps.world_group)

    def _resume(self) -> None:
        if self.engine is None:  # called by Trainer.__init__ before stage 6: wait for the engine
            return
        if not (self.ds_dir / "latest").is_file():
            native = self.ckpt.latest_valid()  # collective: every rank calls it
            if self.rank == 0 and native is not None:
                log.warning(
                    "native checkpoints in %s are not resumed by engine=deepspeed", self.run_dir
                )
            return
        with self._plain_checkpoint_path():
            path, client = self.engine.load_checkpoint(str(self.ds_dir))
        if path is None:
            raise ValueError(
                f"DeepSpeed checkpoint named by {self.ds_dir / 'latest'} could not be loaded"
            )
        meta = client["diffmoe"]
        now = {"world_size": self.world_size, "ep": self.ps.ep}
        if meta["layout"] != now:
            raise ValueError(
                f"DeepSpeed checkpoint {path} was saved at world {meta['layout']['world_size']}, ep "
                f"{meta['layout']['ep']}; this run has world {self.world_size}, ep {self.ps.ep}. "
                "DeepSpeed checkpoints resume on the same layout; use engine=native to change it"
            )
        if meta["model_fields"] != config_hash_fields(self.cfg):
            raise ValueError(
                f"DeepSpeed checkpoint {path} is from another model: {meta['model_fields']}"
            )
        if (
            meta["pool_samples"] != self.cfg.moe.pool_samples
            and not self.cfg.train.allow_pool_change
        ):
            raise ValueError(
                f"checkpoint {path} was trained with moe.pool_samples={meta['pool_samples']}, the config "
                f"says {self.cfg.moe.pool_samples}; set train.allow_pool_change=true to resume anyway"
            )
        extra = torch.load(
            self.ds_dir / f"{TAG_PREFIX}{meta['step']:08d}" / f"diffmoe_rank{self.rank:05d}.pt",
            map_location=self.device,
            weights_only=True,
        )
        with torch.no_grad():
            self.model.load_state_dict(extra["model"])
        self.ema.load_state_dict(extra["ema"])
        torch.set_rng_state(extra["rng"])
        self.step = self._last_saved = int(meta["step"])
        self.metrics.truncate_after(self.step)
        if self.rank == 0:
            print(f"resumed DeepSpeed checkpoint {path} at step {self.step}", flush=True)
