"""The MoE FFN of DiffMoE: router -> select -> dispatch -> experts -> combine, four routing modes.

Shapes: x [B, T, D] (B samples of T tokens), flattened to N = B*T tokens; E experts of the layer
(E_local of them on this rank under expert parallelism); scores [N, E].

Routing modes (one layer, chosen by config):
  dense    plain FFN, no router.
  tc       token choice: softmax gate, each token goes to its top-1 expert (ties -> lower expert),
           weight = its probability; Switch load-balancing loss over the pool.
  ec       expert choice within each image: every expert takes its top-k of the image's T tokens,
           k = floor(T * C / E).
  diffmoe  expert choice over a pool of `pool_samples` consecutive samples (S = pool_samples * T
           tokens): every expert takes its top-k, k = floor(S * C / E). Scores are the softmax over
           experts *before* selection and are not renormalised; a token chosen by no expert gets 0.

The layer never talks to torch.distributed: it hands the selected tokens to a *dispatcher*
(``LocalDispatcher`` here; parallel/dispatch.py installs an all-to-all one). When a pool spans
several ranks, the dispatcher also gathers the pool's scores so every rank of the pool computes the
same selection; the combine weight is applied on the token's own rank.

Losses and statistics of the last forward are left in ``layer.stats`` (an ``MoEStats``); the trainer
collects them. Thresholds move only in ``update_thresholds``, which the trainer calls after the
optimizer step with the average over all pools of the step (the all-reduce lives in the trainer).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmoe_dist.models.routing import capacity_k, kth_largest, token_choice, topk_mask

# The names of the layer's choices, defined here once (config.py, the benchmarks and the studies
# import them). Routing modes (config moe.mode): dense, or one of the modes with a router and experts.
MOE_MODES = ("tc", "ec", "diffmoe")
ROUTING_MODES = ("dense", *MOE_MODES)
# Modes with a training capacity C (every expert takes its top-k, k = floor(tokens * C / E)).
EXPERT_CHOICE_MODES = ("ec", "diffmoe")
# Modes that look at pools of moe.pool_samples samples: diffmoe routes over them, tc takes its
# load-balancing statistics over them. The pool is then part of the model (layout, checkpoints).
POOLED_MODES = ("tc", "diffmoe")
# Inference rules (config moe.infer_mode): static top-k, or a rule that reads the capacity predictor.
PREDICTOR_RULES = ("dynamic", "gamma", "independent")
INFER_RULES = ("static", *PREDICTOR_RULES)


class FeedForward(nn.Module):
    """The DiT FFN: Linear(D, H) -> GELU(tanh) -> Linear(H, D), with biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def expert_compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: low-precision weights' own (DeepSpeed bf16), else the
    autocast dtype when autocast is on (its matmuls would round the tokens to it anyway), else x's."""
    if weight.dtype in (torch.bfloat16, torch.float16):
        return weight.dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_BUILD_SLICE: list[tuple[int, int]] = []  # (ep, ep_rank) while inside expert_slice()


@contextmanager
def expert_slice(ep: int, ep_rank: int) -> Iterator[None]:
    """Models built inside keep only experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of each layer.

    The other experts are never stored: their random init is drawn into a one-expert scratch buffer
    and dropped, so the generator advances exactly as for the full model and the kept weights are
    bit-identical to building all E experts and slicing (what parallel/parallelize.py did before).
    """
    _BUILD_SLICE.append((ep, ep_rank))
    try:
        yield
    finally:
        _BUILD_SLICE.pop()


def grouped_mm_available(x: torch.Tensor, hidden: int | None = None) -> bool:
    """torch._grouped_mm runs here: CPU in fp32 / bf16; CUDA in bf16 on sm90+ (H100 / H200); rows of
    x [M, D] (and of the hidden [M, H]) a multiple of 16 bytes, as the kernel requires."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    for n in (x.shape[-1], hidden or x.shape[-1]):
        if (n * x.element_size()) % 16:
            return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
    """FLOPs of torch._grouped_mm for FlopCounterMode (it has no formula of its own): every row of
    the ragged operand meets one group's matrix once: 2 x rows x inner x cols, exact FLOPs."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # [M, K] x [G, K, N] (offs over M)
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # [K, M] x [M, N] (offs over M) -> [G, K, N]
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # [G, M, K] x [K, N] (offs over N)
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[-1]  # [G, M, K] x [G, K, N]


if hasattr(torch.ops.aten, "_grouped_mm"):
    from torch.utils.flop_counter import register_flop_formula

    try:
        register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)
    except RuntimeError:  # already registered (a torch that counts it itself)
        pass


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: _grouped_mm's backward refuses the
    stride-0 gradients that e.g. ``out.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.contiguous()


class StackedExperts(nn.Module):
    """E full-width DiT FFNs stored as stacked weights, computed with batched matmuls.

    w1 [E, D, H], b1 [E, H], w2 [E, H, D], b2 [E, D]. Under expert parallelism a rank keeps a slice of
    ``num_experts`` experts starting at global index ``expert_offset`` (checkpoints use global indices)
    out of ``total_experts``; built inside ``expert_slice`` it holds only its slice from the start.
    ``forward`` takes tokens grouped by expert (ascending), with ``counts[e]`` rows for local expert e.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, expert_offset: int = 0):
        super().__init__()
        self.total_experts, self.dim, self.hidden = num_experts, dim, hidden
        if _BUILD_SLICE:
            ep, ep_rank = _BUILD_SLICE[-1]
            if num_experts % ep:
                raise ValueError(
                    f"parallel.ep={ep} does not divide the layer's {num_experts} experts"
                )
            num_experts //= ep
            expert_offset += ep_rank * num_experts
        self.num_experts, self.expert_offset = num_experts, expert_offset
        self.use_grouped_mm = True  # uneven counts via torch._grouped_mm where available
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # xavier-uniform per expert with the fans of nn.Linear(D, H) / nn.Linear(H, D), as DiT inits FFNs.
        bound = math.sqrt(6.0 / (self.dim + self.hidden))
        with torch.no_grad():
            if self.num_experts == self.total_experts or self.w1.is_meta:
                self.w1.uniform_(-bound, bound, generator=generator)
                self.w2.uniform_(-bound, bound, generator=generator)
            else:  # a slice: draw every expert in order (one at a time), keep this slice's
                lo, n = self.expert_offset, self.num_experts
                for w in (self.w1, self.w2):
                    scratch = torch.empty_like(w[0])
                    for e in range(self.total_experts):
                        scratch.uniform_(-bound, bound, generator=generator)
                        if lo <= e < lo + n:
                            w[e - lo].copy_(scratch)
            self.b1.zero_()
            self.b2.zero_()

    def forward(
        self, x: torch.Tensor, counts: torch.Tensor, counts_list: list[int] | None = None
    ) -> torch.Tensor:
        """x [M, D] grouped by local expert, counts [E_local] (sum M) -> [M, D].

        ``counts_list``: the same counts already on the host (no device sync to read them).
        """
        E = self.num_experts
        c = counts_list if counts_list is not None else counts.tolist()
        if len(set(c)) == 1:
            # Static shapes (training: every expert takes exactly k tokens): one bmm per matrix.
            h = x.view(E, c[0], self.dim)
            return self._ffn(h).reshape(-1, self.dim)
        if self.use_grouped_mm and grouped_mm_available(x, self.hidden):
            return self._grouped_ffn(x, c)
        # Uneven counts (token choice, dynamic inference, expert parallelism's received rows): one
        # addmm pair per non-empty expert on split() / unbind() views, whose backwards are one cat /
        # one stack. Exact FLOPs: a padded [E, max_count, D] bmm costs E * max_count rows, 12% over at
        # TC's initial balance and several times over once token choice is imbalanced (docs/benchmarks.md).
        xs = x.split(c)
        w1, b1 = self.w1.to(x.dtype).unbind(0), self.b1.to(x.dtype).unbind(0)
        w2, b2 = self.w2.to(x.dtype).unbind(0), self.b2.to(x.dtype).unbind(0)
        outs = []
        for e, n in enumerate(c):
            if n:
                h = F.gelu(torch.addmm(b1[e], xs[e], w1[e]), approximate="tanh")
                outs.append(torch.addmm(b2[e], h, w2[e]))
        return torch.cat(outs)

    def _grouped_ffn(self, x: torch.Tensor, c: list[int]) -> torch.Tensor:
        """Uneven counts in two torch._grouped_mm calls (one kernel each, exact FLOPs); the bias of
        each row is its expert's, gathered by the row's expert index. x [M, D] -> [M, D]."""
        dev, dt, M = x.device, x.dtype, x.shape[0]
        counts = torch.tensor(c, dtype=torch.long)  # host list -> tensor: no device read
        offs = counts.cumsum(0).to(device=dev, dtype=torch.int32)  # end row of each expert
        expert_of_row = torch.repeat_interleave(
            torch.arange(len(c), device=dev), counts.to(dev), output_size=M
        )
        h = torch._grouped_mm(x.contiguous(), self.w1.to(dt), offs=offs)  # [M, H]
        h = F.gelu(h + self.b1.to(dt).index_select(0, expert_of_row), approximate="tanh")
        y = _ContiguousGrad.apply(torch._grouped_mm(h, self.w2.to(dt), offs=offs))  # [M, D]
        return y + self.b2.to(dt).index_select(0, expert_of_row)

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        h = torch.baddbmm(self.b1.unsqueeze(1).to(h.dtype), h, self.w1.to(h.dtype))  # [E, c, H]
        h = F.gelu(h, approximate="tanh")
        return torch.baddbmm(self.b2.unsqueeze(1).to(h.dtype), h, self.w2.to(h.dtype))  # [E, c, D]

    def loop_forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The slow, obvious reference: one expert at a time."""
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            xe = x[start : start + n]
            h = F.gelu(xe @ self.w1[e] + self.b1[e], approximate="tanh")
            outs.append(h @ self.w2[e] + self.b2[e])
            start += n
        return torch.cat(outs, 0) if outs else x.new_zeros(0, self.dim)


class _Combine(torch.autograd.Function):
    """out [N, D] = sum over pairs m of w[m] * y[m] added at row tok[m]; see ``combine``.

    Autograd of ``zeros.index_add_(0, tok, y * w[:, None])`` keeps the [M, D] product and runs two
    broadcast multiplies, a full multiply and a sum in backward; here backward gathers the output
    gradient once and reuses it (issue 8: this and the gather were most of the layer's overhead).
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, n: int, dtype):  # type: ignore[override]
        ctx.save_for_backward(y, w, tok)
        contrib = (y * w[:, None]).to(dtype)  # [M, D], promoted like the autograd expression
        return torch.zeros(n, y.shape[1], dtype=dtype, device=y.device).index_add_(0, tok, contrib)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        y, w, tok = ctx.saved_tensors
        work = torch.promote_types(y.dtype, w.dtype)
        gs = grad_out.index_select(0, tok).to(work)  # [M, D]
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.linalg.vecdot(gs, y.to(work)).to(w.dtype)  # [M]
        grad_y = gs.mul_(w[:, None].to(work)).to(y.dtype) if ctx.needs_input_grad[0] else None
        return grad_y, grad_w, None, None, None


def combine(
    y: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Weighted scatter-add of expert outputs back to their tokens.

    y [M, D] expert outputs per (token, expert) pair, w [M] combine weights, tok [M] token of each
    pair (int64, or int32: on CPU the faster index_add_) -> [n, D] in ``dtype``; a token chosen by
    no expert gets zeros.
    """
    return _Combine.apply(y, w, tok, n, dtype)


class CapacityPredictor(nn.Module):
    """Linear(D, D) -> SiLU -> Linear(D, E): logit that expert e would choose the token."""

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class Dispatcher(Protocol):
    """What the MoE layer needs from parallelism (see parallel/dispatch.py for the all-to-all one)."""

    pool_span: int  # ranks one training pool spans (1: pools live within this rank)
    pool_index: int  # this rank's position inside its pool group

    def gather_pool(self, t: torch.Tensor) -> torch.Tensor:
        """[N_local, E] -> [pool_span * N_local, E] in global token order (no autograd)."""
        ...

    def host_counts(self, counts: torch.Tensor) -> tuple[list[int], list[list[int]] | None]:
        """Uneven counts [E] -> (the same on the host, what each ep rank will send to this one
        [ep][E_local] or None) with ONE device read: the layer's only host sync."""
        ...

    def run_experts(
        self,
        x: torch.Tensor,
        counts: torch.Tensor,
        experts: StackedExperts,
        layer_id: int,
        tok_idx: torch.Tensor | None = None,
        counts_list: list[int] | None = None,
        static: bool = False,
        recv_list: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """x [M, D] grouped by *global* expert (ascending), counts [E] -> expert outputs [M, D].

        tok_idx [M]: the local token of each row, so a dispatcher can send a token chosen by several
        experts of one rank only once (parallel.dedup_tokens). counts_list: ``counts`` on the host.
        static: every rank of the expert-parallel group has exactly these counts (expert choice
        with a pool on one rank), so no counts need exchanging and every split is known.
        recv_list: the counts host_counts received (then no exchange here).
        """
        ...


class LocalDispatcher:
    """ep = 1: every expert is here, tokens are already grouped by expert; nothing moves."""

    pool_span = 1
    pool_index = 0

    def __init__(self, use_loop: bool = False):
        self.use_loop = use_loop

    def gather_pool(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def host_counts(self, counts: torch.Tensor) -> tuple[list[int], list[list[int]] | None]:
        return counts.tolist(), None

    def run_experts(
        self,
        x: torch.Tensor,
        counts: torch.Tensor,
        experts: StackedExperts,
        layer_id: int,
        tok_idx: torch.Tensor | None = None,
        counts_list: list[int] | None = None,
        static: bool = False,
        recv_list: list[list[int]] | None = None,
    ) -> torch.Tensor:
        if self.use_loop:
            return experts.loop_forward(x, counts)
        return experts(x, counts, counts_list)


@dataclass
class MoEStats:
    """What one forward of an MoE layer leaves for the trainer / sampler (all local to this rank)."""

    tokens: int = 0  # N tokens routed on this rank
    pairs: int = 0  # (token, expert) pairs processed for this rank's tokens
    num_experts: int = 0
    expert_counts: torch.Tensor | None = None  # [E] tokens of this rank per expert (long)
    token_pairs: torch.Tensor | None = None  # [N] experts that processed each token (long)
    cp_loss: torch.Tensor | None = None  # predictor BCE (mean over this rank's tokens)
    balance_loss: torch.Tensor | None = None  # tc Switch loss
    kth_sum: torch.Tensor | None = (
        None  # [E] sum over this step's pools of the k-th largest probability
    )
    kth_count: int = 0  # number of pools summed into kth_sum
    pred_mask: torch.Tensor | None = None  # [N, E] predictor says "chosen" (sigmoid > threshold)
    route_mask: torch.Tensor | None = None  # [N, E] actual routing
    extra: dict = field(default_factory=dict)

    @property
    def capacity(self) -> float:
        """Realised capacity: pairs per token, so static top-k with capacity C gives exactly C.

        (Equivalently the mean over experts of k_e / (S / E).)
        """
        return self.pairs / max(self.tokens, 1)


class MoELayer(nn.Module):
    """One MoE FFN. ``mode`` in dense | tc | ec | diffmoe; see the module docstring."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        mode: str = "diffmoe",
        capacity: float = 1.0,
        pool_samples: int = 64,
        predictor: bool = True,
        threshold_decay: float = 0.95,
        layer_id: int = 0,
    ):
        super().__init__()
        if mode not in ROUTING_MODES:
            raise ValueError(f"moe mode {mode!r}; expected one of {ROUTING_MODES}")
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts}; must be >= 1")
        if capacity <= 0:
            raise ValueError(f"capacity={capacity}; must be > 0")
        self.dim, self.hidden, self.num_experts, self.mode = dim, hidden, num_experts, mode
        self.capacity, self.pool_samples, self.layer_id = capacity, pool_samples, layer_id
        self.threshold_decay = threshold_decay
        self.has_predictor = mode == "diffmoe" and predictor
        if mode == "dense":
            self.ffn = FeedForward(dim, hidden)
        else:
            self.router = nn.Linear(dim, num_experts, bias=False)
            self.experts = StackedExperts(num_experts, dim, hidden)
        if self.has_predictor:
            self.predictor = CapacityPredictor(dim, num_experts)
        # One threshold per expert (global index), moved by update_thresholds after the optimizer step.
        self.register_buffer("thresholds", torch.zeros(num_experts))
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.infer_rule, self.infer_capacity, self.gamma = "static", 1.0, 0.4
        self.stats = MoEStats()
        self._rows_per_expert: int | None = None  # static rows per expert of the current forward

    # ------------------------------------------------------------------------------------------------
    def set_inference(self, rule: str, capacity: float = 1.0, gamma: float = 0.4) -> None:
        if rule not in INFER_RULES:
            raise ValueError(f"inference rule {rule!r}; expected one of {INFER_RULES}")
        if rule != "static" and not self.has_predictor:
            raise ValueError(f"inference rule {rule!r} needs the capacity predictor (mode diffmoe)")
        self.infer_rule, self.infer_capacity, self.gamma = rule, capacity, gamma

    @torch.no_grad()
    def update_thresholds(self, mean_kth: torch.Tensor) -> None:
        """EMA step: threshold <- decay * threshold + (1 - decay) * mean k-th largest probability."""
        d = self.threshold_decay
        self.thresholds.mul_(d).add_(mean_kth.to(self.thresholds), alpha=1.0 - d)

    # ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        if self.mode == "dense":
            self.stats = MoEStats(tokens=B * T, pairs=B * T, num_experts=1)
            return self.ffn(x)
        xf = x.reshape(B * T, D)  # [N, D]
        N, E = B * T, self.num_experts
        # Routing math in fp32 even under autocast: selection must not depend on bf16 rounding.
        scores = torch.softmax(self.router(xf).float(), dim=-1)  # [N, E]
        pred_logits = self.predictor(xf.detach()).float() if self.has_predictor else None
        # the predictor's probabilities, computed once: routing statistics and the telemetry mask
        probs = torch.sigmoid(pred_logits.detach()) if pred_logits is not None else None
        stats = MoEStats(tokens=N, num_experts=E)
        mask = self._route(scores, probs, B, T, stats)  # [N, E] bool, this rank's tokens
        if pred_logits is not None and self.training:
            stats.cp_loss = F.binary_cross_entropy_with_logits(pred_logits, mask.float())
        if probs is not None:
            stats.pred_mask = probs > self.thresholds
        rows = self._rows_per_expert  # set by _route: every expert's row count when it is static
        if rows is not None:
            # Static shapes (expert choice, pools on this rank): exactly `rows` pairs per expert,
            # known before the step, so nothing is read back from the device.
            counts_list, recv_list = [rows] * E, None
            counts = torch.full((E,), rows, dtype=torch.long, device=xf.device)
        else:
            counts = mask.sum(0)  # [E]
            # the one host sync of an uneven layer (with the dispatcher's count exchange folded in)
            counts_list, recv_list = self.dispatcher.host_counts(counts)
        # grouped by expert, then token index (nonzero's order) with a size known on the host
        exp_idx, tok_idx = torch.nonzero_static(mask.t(), size=sum(counts_list)).unbind(1)
        # The gathers and the combine index with int32 on CPU: torch's CPU index_add_ (the combine,
        # and index_select's backward) sends a long index along dim 0 to scatter_add's parallel
        # sorted path, about 10x the plain row loop it takes for int32 here (docs/benchmarks.md).
        idx_dt = torch.int32 if xf.device.type == "cpu" and N * E < 2**31 else torch.long
        tok_g = tok_idx.to(idx_dt)
        # [M] combine weights, not renormalised: scores[tok_idx, exp_idx] as one flat index_select
        # (backward: one 1-D index_add_, not advanced indexing's accumulating index_put_)
        weights = scores.reshape(-1).index_select(0, (tok_idx * E + exp_idx).to(idx_dt))
        # index_select, not xf[tok_idx]: its backward is one index_add_ instead of a zero-filled
        # accumulate-index_put (about 3x faster on CPU at N = 8192).
        # Tokens leave in the experts' compute dtype (bf16 under autocast or with bf16 weights), so
        # the all-to-all moves half the bytes of fp32 and bf16 weights are never copied to fp32.
        x_sel = xf.index_select(0, tok_g).to(expert_compute_dtype(xf, self.experts.w1))
        y_sel = self.dispatcher.run_experts(
            x_sel,
            counts,
            self.experts,
            self.layer_id,
            tok_idx=tok_idx,
            counts_list=counts_list,
            # every rank has the same counts only in training (same micro-batch on every rank)
            static=rows is not None and self.training,
            recv_list=recv_list,
        )
        out = combine(y_sel, weights, tok_g, N, xf.dtype)
        stats.pairs = int(tok_idx.numel())
        stats.expert_counts = counts.detach()
        stats.token_pairs = mask.sum(1).detach()
        stats.route_mask = mask
        self.stats = stats
        return out.view(B, T, D)

    # ------------------------------------------------------------------------------------------------
    def _pools(self, B: int, T: int) -> tuple[int, int, int]:
        """(pools on this rank, tokens per pool S, span) for diffmoe / tc pooling."""
        span = self.dispatcher.pool_span if self.training else 1
        P = self.pool_samples
        if span > 1:
            if P != span * B:
                raise ValueError(
                    f"pool of {P} samples cannot span {span} ranks with micro-batch {B} (needs {P // span})"
                )
            return 1, P * T, span
        if self.training:
            if B % P:
                raise ValueError(
                    f"micro-batch {B} is not a multiple of moe.pool_samples={P} "
                    "(pools are pool_samples consecutive samples)"
                )
            return B // P, P * T, 1
        # Inference: pools of pool_samples when they tile the batch, else the whole batch is one pool.
        if B % P == 0:
            return B // P, P * T, 1
        return 1, B * T, 1

    def _pool_view(self, t: torch.Tensor, pools: int, S: int, span: int) -> torch.Tensor:
        """[N, E] local -> [pools, S, E] over the whole pool (gathered across ranks when span > 1)."""
        if span > 1:
            t = self.dispatcher.gather_pool(t)
        return t.reshape(pools, S, t.shape[-1])

    def _local(self, pool_mask: torch.Tensor, N: int, span: int) -> torch.Tensor:
        flat = pool_mask.reshape(-1, pool_mask.shape[-1])
        if span > 1:
            start = self.dispatcher.pool_index * N
            return flat[start : start + N]
        return flat

    def _route(
        self,
        scores: torch.Tensor,
        probs: torch.Tensor | None,
        B: int,
        T: int,
        stats: MoEStats,
    ) -> torch.Tensor:
        E, N = self.num_experts, B * T
        sel = scores.detach()
        self._rows_per_expert = None  # stays None unless every expert's row count is static
        if self.mode == "tc":
            mask = token_choice(sel)
            if self.training:
                pools, S, span = self._pools(B, T)
                # Switch loss E * sum_e f_e * P_e per pool; f_e (no grad) over the whole pool. With a
                # pool spanning `span` ranks each rank adds its share of P_e times span, so the
                # world-averaged gradient equals one process holding the pool.
                f = self._pool_view(mask.float(), pools, S, span).mean(1)  # [pools, E]
                p_share = scores.reshape(pools, -1, E).sum(1) / S * span  # [pools, E]
                stats.balance_loss = E * (f * p_share).sum(-1).mean()
            return mask
        if self.mode == "ec":
            C = self.capacity if self.training else self.infer_capacity
            k = capacity_k(T, C, E)
            self._rows_per_expert = B * max(0, min(k, T))
            return topk_mask(sel.view(B, T, E), k).view(N, E)
        # diffmoe
        pools, S, span = self._pools(B, T)
        pool_scores = self._pool_view(sel, pools, S, span)  # [pools, S, E]
        if self.training or self.infer_rule == "static":
            C = self.capacity if self.training else self.infer_capacity
            k = capacity_k(S, C, E)
            if span == 1:  # the pools are this rank's: each expert takes exactly k per pool
                self._rows_per_expert = pools * max(0, min(k, S))
            pool_mask = topk_mask(pool_scores, k)
            if self.training and probs is not None:
                kth = kth_largest(self._pool_view(probs, pools, S, span), k)  # [pools, E]
                stats.kth_sum, stats.kth_count = kth.sum(0), pools
            return self._local(pool_mask, N, span)
        thr = self.thresholds if self.infer_rule in ("dynamic", "independent") else self.gamma
        if self.infer_rule == "independent":
            return probs > thr  # each token on its own: independent of its batch-mates
        # dynamic / gamma: the predictor counts how many pool tokens expert e takes, the router chooses.
        k_e = (self._pool_view(probs, pools, S, span) > thr).sum(1)  # [pools, E]
        return self._local(topk_mask(pool_scores, k_e), N, span)
