"""Apply expert and data parallelism to an unchanged DiffMoE, and the collectives around a step.

Order of a training step under this module (DESIGN.md section 2):
    build_parallel_state(cfg, world, rank)      groups, created in the same order on every rank
    parallelize_model(model, ps)                 1. shard experts  2. install the dispatcher
    GradReducer(model, ps, ...)                  3. gradient reduction: "overlap" (default) wraps the
                                                    model in torch DDP over the world for the dense
                                                    parameters (experts ignored) and reduces expert
                                                    grads over edp with bucketed async hooks, both
                                                    issued *during* backward; "flat" = average_gradients
    forward / backward                           the dispatcher's all-to-alls (+ DDP's bucket all-reduces)
    reducer.finish()                             waits for the last buckets (dense: SUM / W over world;
                                                    experts: SUM / W over edp)
    optimizer.step()
    reduce_thresholds(model, ps)                 kth statistics SUM over world, then the EMA update

Every collective names its group; with world_size == 1 there are no groups and no collectives.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ProcessGroup

from diffmoe_dist.config import Config
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.models.moe import LocalDispatcher, MoELayer, StackedExperts, expert_slice
from diffmoe_dist.parallel.comm import COMM_CLOCK
from diffmoe_dist.parallel.distributed import all_reduce, all_reduce_async
from diffmoe_dist.parallel.layout import Layout, layout_from_config

GRAD_REDUCE_MODES = ("overlap", "flat")
GRAD_REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    parallelism is applied by average_gradients after backward (no wrapper module).
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


def is_expert_param(name: str, param: torch.Tensor) -> bool:
    """True for parameters sharded over the expert-parallel group (reduced over edp, not world)."""
    return bool(getattr(param, "is_expert", False)) or ".experts." in f".{name}"


# ----------------------------------------------------------------------------------------------------
def _all_reduce_flat(grads: list[torch.Tensor], group: ProcessGroup, scale: float) -> None:
    """One SUM all-reduce per dtype of the flattened grads, then grad *= scale, in place."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for ts in by_dtype.values():
        flat = _flatten_dense_tensors(ts)
        all_reduce(flat, group, ts[0].device)  # gradients live on the parameters' device
        flat.mul_(scale)
        for t, r in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(r)


def average_gradients(model: nn.Module, ps: ParallelState) -> None:
    """Dense grads SUM over world_group / W; expert grads SUM over edp_group / W.

    The same divide factor W for both: each rank's loss is a mean over its own micro-batch, so
    sum/W of the per-rank gradients is the gradient of the mean over the global batch, for dense
    parameters and for the expert slices alike (an expert's gradient already sums, through the
    all-to-all backward, the contributions of every rank of its ep group).
    """
    if ps.world_size == 1:
        return
    with COMM_CLOCK.blocking():  # nothing overlaps it: all of it is exposed communication
        _average_gradients(model, ps)


def _average_gradients(model: nn.Module, ps: ParallelState) -> None:
    dense, expert = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # keep the collectives identical on every rank
        (expert if is_expert_param(name, p) else dense).append(p.grad)
    scale = 1.0 / ps.world_size
    if dense:
        _all_reduce_flat(dense, ps.world_group, scale)
    if expert:
        if ps.edp_group is None or ps.world_size // ps.ep == 1:
            for g in expert:
                g.mul_(scale)
        else:
            _all_reduce_flat(expert, ps.edp_group, scale)


@torch.no_grad()
def reduce_thresholds(model: nn.Module, ps: ParallelState) -> None:
    """Post-step hook: SUM kth_sum / kth_count of every MoE layer over world_group, then the EMA.

    A pool spanning m ranks is counted m times in both the sum and the count, so the mean is exact.
    Layers without statistics (no predictor, eval forward) are skipped identically on every rank.
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.stats.kth_sum is not None]
    if not layers:
        return
    packed = torch.cat(
        [
            torch.cat(
                [m.stats.kth_sum.float(), m.stats.kth_sum.new_tensor([m.stats.kth_count]).float()]
            )
            for m in layers
        ]
    )
    if ps.world_size > 1:
        with COMM_CLOCK.blocking():
            all_reduce(packed, ps.world_group, packed.device)  # the thresholds' device
    start = 0
    for m in layers:
        E = m.stats.kth_sum.numel()
        kth_sum, count = packed[start : start + E], packed[start + E]
        start += E + 1
        m.update_thresholds(kth_sum / count.clamp(min=1.0))


# ----------------------------------------------------------------------------------------------------
class _ExpertBuckets:
    """Expert gradients SUM-reduced over the edp group by async all-reduces issued from backward.

    Buckets are fixed at construction (reverse registration order, ~``bucket_bytes`` each, the same on
    every rank, so the collectives match whatever order hooks fire in); a bucket's all-reduce starts
    from a post-accumulate-grad hook as soon as its last parameter's gradient is final. The wire
    dtype is ``reduce_dtype`` (bf16 halves the bytes); the sum lands back in the fp32 .grad, / W.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        group: ProcessGroup | None,
        scale: float,
        reduce_dtype: torch.dtype,
        bucket_bytes: int,
        trace: list | None,
    ):
        self.group, self.scale, self.reduce_dtype, self.trace = group, scale, reduce_dtype, trace
        self.buckets: list[list[nn.Parameter]] = []
        cur: list[nn.Parameter] = []
        size = 0
        for p in reversed(params):
            cur.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(cur)
                cur, size = [], 0
        if cur:
            self.buckets.append(cur)
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.enabled = True  # False under no_sync (gradient accumulation)
        self._reset()
        if group is not None:
            for p in params:
                p.register_post_accumulate_grad_hook(self._ready)

    def _reset(self) -> None:
        self.pending = [len(b) for b in self.buckets]
        self.works: dict[int, tuple] = {}

    def _ready(self, p: torch.Tensor) -> None:
        if not self.enabled:
            return
        i = self.bucket_of[id(p)]
        self.pending[i] -= 1
        if self.pending[i] == 0:
            self._launch(i)

    def _launch(self, i: int) -> None:
        ps = self.buckets[i]
        for p in ps:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in ps]).to(self.reduce_dtype)
        if self.trace is not None:
            self.trace.append(("expert_bucket", i, time.perf_counter()))
        work = all_reduce_async(flat, self.group, flat.device)  # the gradients' device
        self.works[i] = (flat, work)

    def finish(self) -> None:
        """Launch what did not fire (params without a gradient), wait, write grad = sum * scale."""
        if self.group is None:  # edp of size 1: nothing to reduce, only the 1 / W
            for b in self.buckets:
                for p in b:
                    if p.grad is not None:
                        p.grad.mul_(self.scale)
            return
        for i in range(len(self.buckets)):
            if i not in self.works:
                self._launch(i)
        # (the wait is exposed communication; GradReducer.finish counts it in its tail)
        for i, (flat, work) in sorted(self.works.items()):
            work.wait()
            out = flat.float() if flat.dtype != torch.float32 else flat
            out.mul_(self.scale)
            off = 0
            for p in self.buckets[i]:
                n = p.numel()
                p.grad.copy_(out[off : off + n].view_as(p.grad))
                off += n
        self._reset()


def _ddp_hook(reduce_dtype: torch.dtype, trace: list | None):
    """A DDP comm hook: torch's allreduce / bf16_compress hook, optionally recording issue times."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    inner = (
        default_hooks.bf16_compress_hook
        if reduce_dtype == torch.bfloat16
        else default_hooks.allreduce_hook
    )

    # Unannotated on purpose: DDP checks annotations by identity, and this module's annotations are
    # strings (from __future__ import annotations). (group: ProcessGroup, bucket: dist.GradBucket)
    def hook(group, bucket):  # noqa: ANN001, ANN202
        if trace is not None:
            trace.append(("dense_bucket", bucket.index(), time.perf_counter()))
        return inner(group, bucket)

    return hook


class GradReducer:
    """Gradient averaging of one training step (dense: world; experts: edp; both / W).

    mode "overlap": the model is wrapped in ``torch.nn.parallel.DistributedDataParallel`` over the
    world group with the expert parameters ignored, so DDP's bucketed all-reduces of the dense
    gradients run while backward continues; expert gradients go through ``_ExpertBuckets`` (async
    all-reduces over edp started from post-accumulate-grad hooks). ``finish()`` after backward waits
    for the expert buckets (DDP waits for its own at the end of backward). mode "flat": the old path,
    ``average_gradients`` after backward (one blocking all-reduce per dtype and group).

    ``reduce_dtype`` bf16 sends gradients in bf16 (DDP's ``bf16_compress_hook``) and accumulates the
    result into the fp32 ``.grad``. Call forward on ``self.module`` (the DDP wrapper or the model).
    ``no_sync()``: accumulate gradients locally (all but the last micro-batch of a step).

    Exposed communication (COMM_CLOCK): "flat" counts the whole reduction; "overlap" counts the time
    from the last gradient produced by backward to the end of ``finish()`` (the reduction nothing
    overlapped).
    """

    def __init__(
        self,
        model: nn.Module,
        ps: ParallelState,
        mode: str = "overlap",
        reduce_dtype: str = "fp32",
        bucket_mb: float = 25.0,
        trace: list | None = None,
    ):
        if mode not in GRAD_REDUCE_MODES:
            raise ValueError(f"train.grad_reduce={mode!r}; expected one of {GRAD_REDUCE_MODES}")
        if reduce_dtype not in GRAD_REDUCE_DTYPES:
            raise ValueError(
                f"train.grad_reduce_dtype={reduce_dtype!r}; expected one of {tuple(GRAD_REDUCE_DTYPES)}"
            )
        if mode == "flat" and reduce_dtype != "fp32":
            raise ValueError(
                f"train.grad_reduce_dtype={reduce_dtype!r} needs train.grad_reduce='overlap' "
                "(the flat path reduces in the gradients' own dtype)"
            )
        if bucket_mb <= 0:
            raise ValueError(f"train.grad_bucket_mb={bucket_mb}; must be > 0")
        self.model, self.ps, self.mode = model, ps, mode
        self.module: nn.Module = model
        self.trace = trace
        self._ddp = None
        self._experts: _ExpertBuckets | None = None
        self._last_grad = 0.0
        self._sync = True
        if ps.world_size == 1:
            return
        if mode == "flat":
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        dtype = GRAD_REDUCE_DTYPES[reduce_dtype]
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        expert_names = [n for n, p in named if is_expert_param(n, p)]
        if len(expert_names) < len(named):
            DDP._set_params_and_buffers_to_ignore_for_model(model, expert_names)
            self._ddp = DDP(
                model,
                process_group=ps.world_group,
                broadcast_buffers=False,  # thresholds move in reduce_thresholds, identically
                bucket_cap_mb=bucket_mb,
                gradient_as_bucket_view=True,  # no extra copy of the dense gradients
                init_sync=False,  # every rank built the same weights from the same seed
            )
            self._ddp.register_comm_hook(ps.world_group, _ddp_hook(dtype, trace))
            self.module = self._ddp
        experts = [p for n, p in named if is_expert_param(n, p)]
        if experts:
            edp = ps.edp_group if ps.world_size // ps.ep > 1 else None
            self._experts = _ExpertBuckets(
                experts, edp, 1.0 / ps.world_size, dtype, int(bucket_mb * 2**20), trace
            )
        for _, p in named:  # the end of compute in backward, for the exposed tail
            p.register_post_accumulate_grad_hook(self._stamp)

    def _stamp(self, p: torch.Tensor) -> None:
        self._last_grad = time.perf_counter()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside accumulates locally; the reduction happens on the next synced backward."""
        self._sync = False
        if self._experts is not None:
            self._experts.enabled = False
        ctx = self._ddp.no_sync() if self._ddp is not None else nullcontext()
        try:
            with ctx:
                yield
        finally:
            self._sync = True
            if self._experts is not None:
                self._experts.enabled = True

    def finish(self) -> None:
        """After the last backward of a step: every gradient averaged (dense / W, experts / W)."""
        if self.ps.world_size == 1:
            return
        if self.mode == "flat":
            average_gradients(self.model, self.ps)
            return
        if self._experts is not None:
            self._experts.finish()
        if self._last_grad:
            COMM_CLOCK.add(time.perf_counter() - self._last_grad)
            self._last_grad = 0.0
