"""``engine: deepspeed``: the same DiffMoE, MoE layer and dispatcher, stepped by a DeepSpeed engine.

DeepSpeedTrainer is the native Trainer (trainer/trainer.py) with its three engine override points
replaced, and nothing else:
    setup_engine           the DeepSpeed engine around the parallelized model; its config is generated
                           from ours (trainer/deepspeed_config.py); its optimizer is the run's optimizer
    backward               engine.backward (ZeRO reduces dense grads over the world, expert grads
                           over the expert-data-parallel group)
    optimizer_step         engine.step (clips, steps, zeroes), the global grad norm, train.nonfinite
    zero_grad, accumulation_context   no-ops (the engine zeroes; no accumulation under DeepSpeed)
    checkpoint_optimizer   DeepSpeedCheckpointState: the ZeRO partitions presented as full fp32
                           tensors per parameter, the layout the native optimizer's state has
Batch, learning rate, thresholds, EMA, logging, preemption and checkpoints are the base class's. A
checkpoint is the project's (checkpoint/) whatever the engine: it resumes at another world size or
ep, with the other engine, and diffmoe-sample / diffmoe-eval / the threshold sweep read it.

Expert parameters: parallelize_model marks them ``allreduce=False, group_name='ep_size_<ep>'`` as
DeepSpeed-MoE does. DeepSpeed only routes such parameters to the expert-data-parallel group when the
engine knows it has MoE layers, which it decides by ``isinstance(module, deepspeed.moe.layer.MoE)``;
our layer is not one (DeepSpeed's TopKGate is token choice and cannot express the pool), so
DiffMoEDeepSpeedEngine sets ``has_moe_layers`` for our MoELayer. Gradient scaling then matches the
native loop exactly: ZeRO divides every gradient by the data-parallel world size W and sums expert
gradients over the edp group (sum / W), as average_gradients does.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from diffmoe_dist.checkpoint import expert_params, split_experts
from diffmoe_dist.models.moe import MoELayer
from diffmoe_dist.parallel.distributed import all_reduce
from diffmoe_dist.parallel.groups import init_deepspeed_comm
from diffmoe_dist.trainer.deepspeed_config import build_deepspeed_config
from diffmoe_dist.trainer.trainer import Trainer

log = logging.getLogger(__name__)
ADAM_KEYS = ("exp_avg", "exp_avg_sq")

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
    # ZeRO 1/2 optimizers say whether they split the expert groups; ZeRO 0 steps a plain optimizer
    if layers and getattr(engine.optimizer, "has_moe_layers", True) is False:
        raise RuntimeError("DeepSpeed's optimizer did not pick up the expert parameter groups")
    return engine


# ----------------------------------------------------------------------------------------------------
# optimizer state in the project's checkpoint format


class DeepSpeedCheckpointState:
    """The engine's fp32 master weights and Adam state as full tensors per parameter.

    ZeRO 1/2 (and DeepSpeed's bf16 optimizer) keep one flat fp32 partition per parameter group and
    rank; DeepSpeed links every module parameter to its fragment (``_hp_mapping``) and its
    ``safe_get_full_*`` / ``safe_set_full_*`` gather / scatter one parameter over that group's
    data-parallel group (the world for dense parameters, the expert-data-parallel group for experts).
    Saved under the native keys (``model.<name>``, ``optim.<name>.exp_avg`` ..., experts split by
    global index), the state loads at any world size / ep and into either engine. ``model.*`` is the
    fp32 master copy, so a bf16 run resumes without losing the low bits.

    Collective: every rank calls checkpoint_state / restore_checkpoint_state in the same order.
    """

    def __init__(self, engine: Any, model: nn.Module):
        self.engine, self.model = engine, model
        self.opt = engine.optimizer
        self._full: dict[str, dict[str, torch.Tensor]] = {}

    def _flat_partitions(self) -> list[torch.Tensor]:
        for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            flats = getattr(self.opt, attr, None)
            if flats is not None:
                return list(flats)
        raise ValueError(f"unsupported DeepSpeed optimizer {type(self.opt).__name__}")

    def _ensure_state(self) -> None:
        """Adam state exists only after the first step; create it (zeros, step 0) and link it."""
        inner = self.opt.optimizer
        for flat in self._flat_partitions():
            st = inner.state[flat]
            if "exp_avg" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                for k in ADAM_KEYS:
                    st[k] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        # Always relink: ZeRO links after its first group's step, when the other groups (the
        # expert group) have no state yet, and never again; their fragments would stay empty.
        self.opt._hp_optimizer_states_linked = False
        self.opt._lazy_init_hp_params_optimizer_state()

    def _step(self) -> float:
        inner = self.opt.optimizer
        steps = [float(inner.state[f]["step"]) for f in self._flat_partitions()]
        return max(steps) if steps else 0.0

    def checkpoint_state(self, model: nn.Module, gather: bool = True) -> dict[str, torch.Tensor]:
        """Flat state (checkpoint/state.py keys); ``gather=False`` allocates load buffers only."""
        self._ensure_state()
        step = self._step() if gather else 0.0
        experts = expert_params(model)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        full = _gather_full_fp32(params) if gather else None
        out: dict[str, torch.Tensor] = {}
        self._full = {}
        for name, p in params:
            if full is not None:
                ent = full[name]
            else:
                ent = {
                    k: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    for k in ("param", *ADAM_KEYS)
                }
            ent["step"] = torch.tensor(step, dtype=torch.float32)
            self._full[name] = ent
            split_experts(f"model.{name}", ent["param"], experts.get(name), out)
            for k in (*ADAM_KEYS, "step"):
                split_experts(f"optim.{name}.{k}", ent[k], experts.get(name), out)
        return out

    @torch.no_grad()
    def restore_checkpoint_state(self) -> None:
        """Scatter the tensors filled by a load into the master weights, module and Adam state."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._ensure_state()
        step = 0.0
        for name, p in self.model.named_parameters():
            ent = self._full.get(name)
            if ent is None:
                continue
            safe_set_full_fp32_param(p, ent["param"])
            p.data.copy_(ent["param"])  # the module's copy (bf16 under DeepSpeed bf16)
            for k in ADAM_KEYS:
                safe_set_full_optimizer_state(p, ent[k], k)
            step = max(step, float(ent["step"]))
        inner = self.opt.optimizer
        for flat in self._flat_partitions():  # every group steps together: one step count
            inner.state[flat]["step"].fill_(step)


def _gather_full_fp32(
    params: list[tuple[str, nn.Parameter]],
) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {"param", "exp_avg", "exp_avg_sq"}: full fp32 tensors shaped like the parameter.

    DeepSpeed's ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` do this one tensor
    at a time: zeros, this rank's ZeRO fragment copied in, a SUM all-reduce over the parameter's
    data-parallel group; 3 all-reduces per parameter. Here every fragment of every parameter goes
    into one zero buffer per group (the world for dense parameters, the expert-data-parallel group
    for experts) and one all-reduce per group assembles them: the same sums, so the same values.
    """
    by_group: dict[int, tuple[Any, list[tuple[str, nn.Parameter]]]] = {}
    for name, p in params:  # same order on every rank: the collectives match
        by_group.setdefault(id(p._dp_group), (p._dp_group, []))[1].append((name, p))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group, members in by_group.values():
        device = members[0][1].device
        buf = torch.zeros(
            sum(3 * p.numel() for _, p in members), dtype=torch.float32, device=device
        )
        off, slots = 0, []
        for name, p in members:
            n = p.numel()
            ent = {}
            for k in ("param", *ADAM_KEYS):
                dst = buf[off : off + n]
                mapping = p._hp_mapping  # None where this rank holds no fragment of p
                if mapping is not None:
                    frag = mapping.get_hp_fragment(None if k == "param" else k)
                    addr = mapping.lp_fragment_address
                    dst[addr.start : addr.start + addr.numel].copy_(frag.detach().reshape(-1))
                ent[k] = dst.view(p.shape)
                off += n
            slots.append((name, ent))
        if dist.get_world_size(group) > 1:
            all_reduce(buf, group, device)
        out.update(slots)
    return out


def checkpoint_view(engine: Any, model: nn.Module) -> Any:
    """What the checkpoint saves for ``engine``: the adapter above for partitioned optimizers, the
    optimizer itself where DeepSpeed steps a plain torch optimizer over the module's parameters
    (ZeRO 0 in fp32)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params and all(hasattr(p, "_hp_mapping") for p in params):
        return DeepSpeedCheckpointState(engine, model)
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        held = {id(q) for g in opt.param_groups for q in g["params"]}
        if all(id(p) in held for p in params):
            return opt
    raise ValueError(
        f"DeepSpeed optimizer {type(engine.optimizer).__name__} cannot be checkpointed in the "
        "project format (supported: ZeRO 1/2 in fp32 or bf16, ZeRO 0 in fp32)"
    )


# ----------------------------------------------------------------------------------------------------


class DeepSpeedTrainer(Trainer):
    """The native Trainer with the engine's override points (see the module docstring)."""

    engine: Any = None

    def setup_engine(self) -> None:
        if not dist.is_initialized():
            # One process, no launcher: DeepSpeed needs a default group; a 1-rank group in memory.
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self.ds_config = build_deepspeed_config(
            self.cfg, self.world_size, self.device.type == "cuda"
        )
        # the forward goes through the module itself: ZeRO 1/2 need no forward hooks
        self.engine = build_engine(self.model, self.ds_config, self.ps.ep, self.dist.local_rank)
        self.optimizer = self.engine.optimizer
        self._ckpt_view = checkpoint_view(self.engine, self.model)

    def zero_grad(self) -> None:
        pass  # engine.step() zeroes the gradients

    def accumulation_context(self, last: bool) -> AbstractContextManager[Any]:
        return nullcontext()  # train.grad_accum_steps is 1 under DeepSpeed (config.py refuses more)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # reduction: dense over world, experts over edp

    def optimizer_step(
        self, losses: dict[str, torch.Tensor]
    ) -> tuple[dict[str, float], float, bool]:
        self.engine.step()  # clip (gradient_clipping), optimizer step, zero grads
        norm = self.engine.get_global_grad_norm()
        out = {k: float(v) for k, v in losses.items()}
        grad_norm = float(norm) if norm is not None else float("nan")
        # train.nonfinite (stop; skip_step is refused for this engine): the engine already stepped
        self._nonfinite_step(out["loss"], 0.0 if norm is None else grad_norm, True)
        return out, grad_norm, False

    def checkpoint_optimizer(self) -> Any:
        return self._ckpt_view
