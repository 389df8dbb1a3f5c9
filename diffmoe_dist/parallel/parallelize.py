"""Apply expert parallelism (and compile) to an unchanged DiffMoE: the one place that shards experts.

Order of a training step (DESIGN.md section 2); the reductions live in parallel/grad_reduce.py:
    build_parallel_state(cfg, world, rank)      groups, created in the same order on every rank
    parallelize_model(model, ps)                 1. shard experts  2. install the dispatcher
    apply_compile(model)                         train.compile: torch.compile per DiT block
    GradReducer(model, ps, ...)                  3. gradient reduction (grad_reduce.py): DDP for the
                                                    dense parameters + async expert buckets over edp
    forward / backward                           the dispatcher's all-to-alls (+ DDP's bucket all-reduces)
    reducer.finish()                             waits for the last buckets (dense: SUM / W over world;
                                                    experts: SUM / W over edp)
    optimizer.step()
    reduce_thresholds(model, ps)                 (grad_reduce.py) kth statistics SUM over world, EMA

Every collective names its group; with world_size == 1 there are no groups and no collectives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import ProcessGroup

from diffmoe_dist.config import Config
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.models.moe import LocalDispatcher, MoELayer, StackedExperts, expert_slice
from diffmoe_dist.parallel.layout import Layout, layout_from_config


@dataclass
class ParallelState:
    """A rank's place in the layout (parallel/layout.py, which owns every number) and its groups."""

    layout: Layout
    rank: int
    world_group: ProcessGroup | None  # None when world_size == 1 (no collectives at all then)
    ep_group: ProcessGroup | None  # ranks sharing one set of experts (size ep)
    edp_group: ProcessGroup | None  # ranks holding the same expert slice (size world/ep)
    pool_group: ProcessGroup | None  # the pool_span consecutive ep ranks one pool spans
    dedup_tokens: bool = False

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def pool_span(self) -> int:
        return self.layout.pool_span

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank(self.rank)

    @property
    def edp_rank(self) -> int:
        return self.layout.edp_rank(self.rank)

    @property
    def pool_index(self) -> int:
        return self.layout.pool_index(self.rank)


# (default group, partition, timeout) -> this rank's group: each partition is created once per
# process (the threshold sweep calls sample_from_checkpoint, hence build_parallel_state, per row).
_GROUPS: dict[tuple, ProcessGroup | None] = {}


def _new_groups(
    groups: list[list[int]], rank: int, timeout: timedelta | None
) -> ProcessGroup | None:
    """This rank's group of a partition of the ranks (collective: all ranks, same order).

    Each NCCL communicator holds GPU memory and costs a split at start-up, so: a partition into
    single ranks creates nothing (None: a group of one needs no collective), the whole world is the
    default group itself, and a partition built before in this process is reused.
    """
    if all(len(g) == 1 for g in groups):
        return None
    world = dist.group.WORLD
    if len(groups) == 1 and sorted(groups[0]) == list(range(dist.get_world_size())):
        return world
    key = (world, tuple(tuple(g) for g in groups), timeout)
    if key not in _GROUPS:
        mine = None
        for ranks in groups:
            g = dist.new_group(ranks=ranks, timeout=timeout)
            if rank in ranks:
                mine = g
        _GROUPS[key] = mine
    return _GROUPS[key]


def build_parallel_state(
    cfg: Config, world_size: int, rank: int, layout: Layout | None = None
) -> ParallelState:
    """Create the process groups of ``layout`` (default: the training layout of ``cfg``, validated
    here with ValueError naming the numbers); the trainer passes the layout it validated at start.

    Needs torch.distributed initialised when world_size > 1. Groups are created in a fixed order
    (world, ep, edp, pool) on every rank, each with cfg.parallel.timeout_s; the world group is the
    default group, groups of one rank are None, and a second call reuses the first call's groups
    (``_new_groups``). ``cleanup()`` (destroy_process_group) destroys them with the default group.
    parallel.groups=torch creates the layout's rank lists here; deepspeed / megatron go through
    groups.build_expert_groups (checked rank for rank against the layout).
    """
    lay = layout if layout is not None else layout_from_config(cfg, world_size)
    if lay.world_size != world_size:
        raise ValueError(f"the layout is for world size {lay.world_size}, not {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside world_size={world_size}")
    world_group = ep_group = edp_group = pool_group = None
    if world_size > 1:
        if not dist.is_initialized():
            raise ValueError(f"world_size={world_size} but torch.distributed is not initialised")
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise ValueError(
                f"world_size={world_size}, rank={rank} disagree with the process group "
                f"(world {dist.get_world_size()}, rank {dist.get_rank()})"
            )
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        world_group = _new_groups([list(range(world_size))], rank, timeout)
        if cfg.parallel.groups == "torch":  # the layout's rank lists, created once per process
            ep_group = _new_groups(lay.ep_groups(), rank, timeout)
            edp_group = _new_groups(lay.edp_groups(), rank, timeout)
        else:
            # DeepSpeed's expert groups or Megatron-core's parallel_state, checked rank for rank
            # against the layout inside build_expert_groups.
            from diffmoe_dist.parallel.groups import build_expert_groups

            eg = build_expert_groups(cfg.parallel.groups, world_size, rank, lay.ep, timeout)
            ep_group, edp_group = eg.ep_group, eg.edp_group
        pool_group = _new_groups(lay.pool_groups(), rank, timeout)
    return ParallelState(
        layout=lay,
        rank=rank,
        world_group=world_group,
        ep_group=ep_group,
        edp_group=edp_group,
        pool_group=pool_group,
        dedup_tokens=cfg.parallel.dedup_tokens,
    )


# ----------------------------------------------------------------------------------------------------
def mark_expert_params(experts: StackedExperts, ep: int) -> None:
    """Tag expert parameters the way DeepSpeed-MoE does (allreduce=False + group_name)."""
    for p in experts.parameters():
        p.is_expert = True
        p.allreduce = False
        p.group_name = f"ep_size_{ep}"


def shard_experts(layer: MoELayer, ep: int, ep_rank: int) -> None:
    """Keep only experts [ep_rank*E/ep, (ep_rank+1)*E/ep) of one layer (in place; global offset kept)."""
    ex = layer.experts
    E = ex.num_experts
    if E != ex.total_experts:  # built inside expert_slice: already this rank's slice
        if ex.total_experts % ep or (E, ex.expert_offset) != (
            ex.total_experts // ep,
            ep_rank * E,
        ):
            raise ValueError(
                f"layer {layer.layer_id} holds experts [{ex.expert_offset}, {ex.expert_offset + E}) "
                f"of {ex.total_experts}, not ep rank {ep_rank}'s slice under ep={ep}"
            )
        return
    if E % ep:
        raise ValueError(f"parallel.ep={ep} does not divide the layer's {E} experts")
    n = E // ep
    lo = ep_rank * n
    for name in ("w1", "b1", "w2", "b2"):
        full = getattr(ex, name)
        setattr(ex, name, nn.Parameter(full.detach()[lo : lo + n].clone()))
    ex.num_experts, ex.expert_offset = n, ex.expert_offset + lo


def build_model(cfg: Config, ps: ParallelState, out_channels: int | None = None) -> DiffMoE:
    """This rank's model on the CPU: dense parts whole, only this rank's experts ever allocated.

    The same weights as ``parallelize_model(DiffMoE(cfg.model, cfg.moe), ps)`` from the same seed
    (models/moe.py ``expert_slice`` draws the other experts' init and drops it), without the
    unsharded model: for DiffMoE-L-E16 at ep 8 that is about 1 GB of experts per rank, not 6.5 GB.
    """
    with expert_slice(ps.ep, ps.ep_rank):
        model = DiffMoE(cfg.model, cfg.moe, out_channels=out_channels)
    return parallelize_model(model, ps)


def build_empty(
    cfg: Config, ps: ParallelState, device: torch.device, out_channels: int | None = None
) -> DiffMoE:
    """This rank's model with uninitialised storage on ``device`` (built on the meta device, no random
    init, no CPU copy): for filling from a checkpoint or another model."""
    with torch.device("meta"), expert_slice(ps.ep, ps.ep_rank):
        model = DiffMoE(cfg.model, cfg.moe, out_channels=out_channels)
    return parallelize_model(model, ps).to_empty(device=device)


def build_copy(model: DiffMoE, cfg: Config, ps: ParallelState, device: torch.device) -> DiffMoE:
    """A frozen copy of ``model`` (the EMA) on ``device``: built on the meta device (no memory, no
    random init), materialised there and filled from ``model``'s parameters and buffers; no deepcopy
    of a CPU model, no second random init."""
    copy = build_empty(cfg, ps, device, out_channels=model.out_channels)
    with torch.no_grad():
        for (na, a), (nb, b) in zip(
            list(copy.named_parameters()) + list(copy.named_buffers()),
            list(model.named_parameters()) + list(model.named_buffers()),
        ):
            assert na == nb, (na, nb)
            a.copy_(b)
    return copy.requires_grad_(False).eval()


def install_dispatcher(layer: MoELayer, ps: ParallelState) -> None:
    """ep = 1: LocalDispatcher (a pure permutation); else one AllToAllDispatcher per layer."""
    if ps.ep == 1 and ps.pool_span == 1:
        layer.dispatcher = LocalDispatcher()
        return
    from diffmoe_dist.parallel.dispatch import AllToAllDispatcher

    layer.dispatcher = AllToAllDispatcher(
        ep=ps.ep,
        ep_group=ps.ep_group,
        pool_span=ps.pool_span,
        pool_index=ps.pool_index,
        pool_group=ps.pool_group,
        layer_id=layer.layer_id,
        dedup_tokens=ps.dedup_tokens,
    )


def parallelize_moe_layer(layer: MoELayer, ps: ParallelState) -> MoELayer:
    """One MoE layer: 1. keep this rank's expert slice  2. mark expert params  3. install dispatcher."""
    if layer.mode == "dense":
        return layer
    if ps.ep > 1:
        shard_experts(layer, ps.ep, ps.ep_rank)
    mark_expert_params(layer.experts, ps.ep)
    install_dispatcher(layer, ps)
    return layer


def parallelize_model(model: DiffMoE, ps: ParallelState) -> DiffMoE:
    """Apply expert parallelism to every MoE layer (parallelize_moe_layer); dense parts untouched.

    Call before building the optimizer (expert parameters are replaced by their slices). Every rank
    must build the model from the same seed so dense weights (and the kept slices) agree. Data
    parallelism is applied by grad_reduce.GradReducer around backward.
    """
    for layer in model.moe_layers():
        parallelize_moe_layer(layer, ps)
    return model


def check_compile_supported(device: torch.device) -> None:
    """ValueError naming train.compile when torch.compile cannot build kernels for ``device``.

    Inductor needs a C++ compiler for CPU kernels and Triton for CUDA kernels; without them the
    first step would fail deep inside the compiler, after the run has started.
    """
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError(
                "train.compile=true needs Triton for CUDA kernels and it is not importable; "
                "install triton (it ships with the CUDA torch wheels) or set train.compile=false"
            )
        return
    import shutil

    cxx = (
        os.environ.get("CXX")
        or shutil.which("g++")
        or shutil.which("c++")
        or shutil.which("clang++")
    )
    if not cxx:
        raise ValueError(
            "train.compile=true on the CPU needs a C++ compiler (g++ / clang++, or $CXX) for "
            "inductor's kernels and none was found; install one or set train.compile=false"
        )


def apply_compile(model: DiffMoE) -> None:
    """torch.compile per DiT block, in place (torchtitan's per-block compile).

    A dense block compiles whole; an MoE block compiles its attention half (adaLN modulation,
    attention, both residual norms) and keeps the MoE layer eager: routing has data-dependent
    shapes and the dispatcher runs collectives, so the graph breaks exactly there and nowhere
    else. Parameters and state-dict keys are unchanged (checkpoints do not see compile).
    """
    for block in model.blocks:
        if block.is_moe:
            block.attn_half = torch.compile(block.attn_half)
        else:
            block.compile()
    model.final_layer.compile()
