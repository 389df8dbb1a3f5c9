"""The reductions of a training step: gradients after backward, routing thresholds after the step.

    GradReducer(model, ps, mode, reduce_dtype, bucket_mb)   train.grad_reduce / grad_reduce_dtype /
                                                            grad_bucket_mb
        "overlap" (default): torch DDP over the world group for the dense parameters (experts
        ignored) and bucketed async all-reduces of the expert gradients over edp, both issued
        *during* backward; finish() waits for the last buckets.
        "flat": average_gradients after backward (one blocking all-reduce per dtype and group).
    reduce_thresholds(model, ps)                            kth statistics SUM over world, then the
                                                            EMA update of each MoE layer's thresholds
    accumulate_kth(model, acc)                              their sum over micro-batches (accumulation)
    global_grad_norm(model, ps, device)                     the full gradient's L2 norm (experts over ep)

Dense gradients are SUM / W over the world group, expert gradients SUM / W over edp (the ranks holding
the same expert slice); parallelize.py decides which parameters are expert slices. Every collective
names its group; with world_size == 1 there are none.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ProcessGroup

from diffmoe_dist.config import GRAD_REDUCE_MODES
from diffmoe_dist.models.moe import MoELayer
from diffmoe_dist.parallel.comm import COMM_CLOCK
from diffmoe_dist.parallel.distributed import all_reduce, all_reduce_async
from diffmoe_dist.parallel.parallelize import ParallelState

GRAD_REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def global_grad_norm(model: nn.Module, ps: ParallelState, device: torch.device) -> torch.Tensor:
    """L2 norm of the full (unsharded) gradient as a 0-dim float64 tensor on ``device``.

    Dense gradients are identical on every rank after the reduction; each rank holds its own expert
    slices, so the experts' squares are summed over the ep group (foreach norms, no host read).
    """
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (expert if is_expert_param(name, p) else dense).append(p.grad.detach())
    zero = torch.zeros((), dtype=torch.float64, device=device)

    def sq(gs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(torch._foreach_norm(gs)).double().square().sum() if gs else zero

    d, e = sq(dense), sq(expert).clone()
    if ps.ep_group is not None and ps.ep > 1:
        with COMM_CLOCK.blocking():
            all_reduce(e, ps.ep_group, device)
    return (d + e).sqrt()


def accumulate_kth(model: nn.Module, acc: list[list]) -> None:
    """After each micro-batch (train.grad_accum_steps > 1): sum the threshold statistics into
    ``acc`` and leave the running sums in the layers' stats, so reduce_thresholds averages over all
    pools of the step, as without accumulation. ``acc`` starts empty, one per step."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.stats.kth_sum is not None]
    if not acc:
        acc.extend([m.stats.kth_sum.clone(), m.stats.kth_count] for m in layers)
        return
    for a, m in zip(acc, layers):
        a[0] += m.stats.kth_sum
        a[1] += m.stats.kth_count
        m.stats.kth_sum, m.stats.kth_count = a[0].clone(), a[1]


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
