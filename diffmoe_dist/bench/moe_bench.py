"""Benchmark of one MoE FFN (forward + backward) against a dense FFN and two slow references.

Implementations timed per shape (width D, experts E, pool of N tokens = N / 256 images, one pool):
  dense        FeedForward(D, 4D): the dense FFN with the same activated FLOPs (C = 1).
  ours         MoELayer(mode) with the stacked-weights batched-matmul experts (the fast path).
  loop         MoELayer(mode) with LocalDispatcher(use_loop=True): the per-expert loop reference.
  loop_buffer  ``LoopBufferMoE``: the layer written the way the public DiffMoE code writes it (Python
               loop over nn.Linear experts, every expert's output scattered into an [E*S, D] buffer
               that is then summed over experts). ``test_bench`` proves it equals ``ours``.

FLOP floor (per token, forward + backward, multiply-add = 2 FLOPs; backward = input grad + weight grad
= 2x forward, except where the input is detached):
  expert FFN  D -> 4D -> D          fwd 16 D^2,  fwd+bwd 48 D^2 per (token, expert) pair
  router      Linear(D, E), no bias fwd 2 DE,    bwd 4 DE                 -> 6 DE
  predictor   Linear(D, D) -> Linear(D, E) on x.detach():
              fwd 2 D^2 + 2 DE; bwd fc2 weight + input 4 DE, fc1 weight only 2 D^2 -> 4 D^2 + 6 DE
  floor(mode) = (48 D^2 C + router + predictor) / 48 D^2 with C = 1 pair per token; diffmoe:
  1 + (4 D^2 + 12 DE) / 48 D^2 = 1.094 at D=384, E=16 (issue 8 writes 4D^2 + 10DE: it leaves out one
  DE-sized term; the difference is 0.3% of the FFN). tc / ec: 1 + E / (8 D). GELU, softmax, top-k,
  gather and scatter are not counted, which is why this is a floor and not an estimate.

Peak memory: CUDA ``max_memory_allocated`` above what was allocated before the step. CPU: one extra,
untimed step under ``torch.profiler(profile_memory=True)``; every op's self allocation/free is summed
in start-time order and the maximum of that running sum is the peak of torch CPU allocations during
the step, above what was live before it (op granularity; RSS and allocator caching are not counted).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmoe_dist.bench.common import check_cases
from diffmoe_dist.models.flops import ffn_forward_flops_per_token, peak_bf16_flops
from diffmoe_dist.models.moe import MOE_MODES, FeedForward, LocalDispatcher, MoELayer

TOKENS_PER_IMAGE = 256  # 32x32x4 latents, patch 2
REQUIRED_KEYS = (
    "mode",
    "width",
    "experts",
    "tokens",
    "ms_median",
    "ms_spread",
    "peak_mem_mb",
    "ratio_vs_dense",
    "speedup_vs_loop_buffer",
)
OPTIONAL_KEYS = ("flop_floor", "speedup_vs_loop", "tflops", "mfu")


# ----------------------------------------------------------------------------------------------------
def flops_per_token(mode: str, dim: int, num_experts: int, capacity: float = 1.0) -> float:
    """Forward + backward FLOPs per token of one layer (see the module docstring): 3 x the forward
    count of models/flops.py, less the capacity predictor's input gradient (its input is detached)."""
    if mode != "dense" and mode not in MOE_MODES:
        raise ValueError(f"mode {mode!r}; expected dense or one of {MOE_MODES}")
    pairs = 1.0 if mode == "tc" else capacity  # tc: exactly one expert per token
    parts = ffn_forward_flops_per_token(mode, dim, 4 * dim, num_experts, pairs)
    total = 3.0 * sum(parts.values())
    if "predictor" in parts:
        total -= 2.0 * dim * dim  # no input gradient through Linear(D, D): x.detach()
    return total


def flop_floor(mode: str, dim: int, num_experts: int, capacity: float = 1.0) -> float:
    """The lowest possible time ratio of ``mode`` vs the dense FFN: FLOPs(mode) / FLOPs(dense)."""
    return flops_per_token(mode, dim, num_experts, capacity) / flops_per_token("dense", dim, 0)


# ----------------------------------------------------------------------------------------------------
class LoopBufferMoE(nn.Module):
    """The MoE layer as the public DiffMoE code writes it: for comparison only, never for training.

    nn.ModuleList of per-expert FFNs and the structure of the public layer's training forward: the
    selected tokens gathered at once ([E, k, D]), a Python loop over experts, the outputs stacked
    and gated, then ONE scatter into a zero [E * S, D] buffer that is summed over experts. EC does
    the same per image (an [B, E * T, D] buffer); TC concatenates its uneven per-expert outputs
    before the one scatter. Routing math is MoELayer's (softmax before selection, expert-choice
    top-k per pool / image, top-1 token choice); ties are left to torch.topk (inputs with ties are
    not used here). forward(x [B, T, D]) -> (y [B, T, D], auxiliary loss: predictor BCE or Switch
    loss, or 0).
    """

    def __init__(self, layer: MoELayer):
        super().__init__()
        if layer.mode not in MOE_MODES:
            raise ValueError(f"LoopBufferMoE needs an MoE mode {MOE_MODES}, got {layer.mode!r}")
        self.mode, self.num_experts = layer.mode, layer.num_experts
        self.capacity, self.pool_samples = layer.capacity, layer.pool_samples
        D, H, E = layer.dim, layer.hidden, layer.num_experts
        self.gate_weight = nn.Parameter(layer.router.weight.detach().clone())  # [E, D]
        self.experts = nn.ModuleList(FeedForward(D, H) for _ in range(E))
        with torch.no_grad():
            for e, ffn in enumerate(self.experts):
                ffn.fc1.weight.copy_(layer.experts.w1[e].t())
                ffn.fc1.bias.copy_(layer.experts.b1[e])
                ffn.fc2.weight.copy_(layer.experts.w2[e].t())
                ffn.fc2.bias.copy_(layer.experts.b2[e])
        self.predictor: nn.Module | None = None
        if layer.has_predictor:
            p = layer.predictor
            self.predictor = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, E))
            self.predictor.load_state_dict(
                {
                    "0.weight": p.fc1.weight,
                    "0.bias": p.fc1.bias,
                    "2.weight": p.fc2.weight,
                    "2.bias": p.fc2.bias,
                }
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        E = self.num_experts
        if self.mode == "ec":
            return self._expert_choice_per_image(x, int(T * self.capacity // E)), x.new_zeros(())
        P = self.pool_samples
        if B % P:
            raise ValueError(f"batch {B} is not a multiple of pool_samples={P}")
        outs, aux = [], x.new_zeros(())
        for pool in x.view(B // P, P * T, D):  # [S, D] per pool
            if self.mode == "tc":
                y, a = self._token_choice(pool)
            else:
                y, a = self._expert_choice(pool, int(P * T * self.capacity // E))
            outs.append(y)
            aux = aux + a / (B // P)
        return torch.stack(outs).view(B, T, D), aux

    def _buffer_sum(self, S: int, rows: torch.Tensor, gated: torch.Tensor) -> torch.Tensor:
        """One scatter of every expert's gated outputs into a zero [E * S, D] buffer, summed over E.

        rows [M]: e * S + token of each output row; gated [M, D].
        """
        D = gated.shape[-1]
        buf = gated.new_zeros(self.num_experts * S, D)
        buf = torch.scatter(buf, 0, rows[:, None].expand(-1, D), gated)
        return buf.view(self.num_experts, S, D).sum(0)

    def _expert_choice(self, xs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        S, E = xs.shape[0], self.num_experts
        scores = F.linear(xs, self.gate_weight).float().softmax(-1).t()  # [E, S]
        gating, index = torch.topk(scores, k=k, dim=-1, sorted=False)  # [E, k]
        x_in = xs[index]  # [E, k, D]
        x_e = torch.stack([expert(x_in[e]) for e, expert in enumerate(self.experts)])  # [E, k, D]
        gated = gating.to(xs.dtype)[..., None] * x_e
        rows = (index + torch.arange(E, device=xs.device)[:, None] * S).view(-1)
        y = self._buffer_sum(S, rows, gated.view(E * k, -1))
        if self.predictor is None:
            return y, xs.new_zeros(())
        mask = torch.zeros_like(scores).scatter_(1, index, 1.0)  # [E, S]
        logits = self.predictor(xs.detach()).float()  # [S, E]
        return y, F.binary_cross_entropy_with_logits(logits, mask.t())

    def _expert_choice_per_image(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """EC: top-k per (image, expert), the same gather / loop / one-scatter buffer per image."""
        B, T, D = x.shape
        E = self.num_experts
        scores = F.linear(x, self.gate_weight).float().softmax(-1).transpose(1, 2)  # [B, E, T]
        gating, index = torch.topk(scores, k=k, dim=-1, sorted=False)  # [B, E, k]
        x_in = torch.gather(
            x[:, None].expand(B, E, T, D), 2, index[..., None].expand(-1, -1, -1, D)
        )
        x_e = torch.stack([expert(x_in[:, e]) for e, expert in enumerate(self.experts)], 1)
        gated = (gating.to(x.dtype)[..., None] * x_e).reshape(B, E * k, D)
        rows = (index + torch.arange(E, device=x.device)[:, None] * T).reshape(B, E * k)
        buf = torch.scatter(x.new_zeros(B, E * T, D), 1, rows[..., None].expand(-1, -1, D), gated)
        return buf.view(B, E, T, D).sum(1)

    def _token_choice(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S, E = xs.shape[0], self.num_experts
        scores = F.linear(xs, self.gate_weight).float().softmax(-1)  # [S, E]
        gate, choice = scores.max(-1)  # [S]
        index = [(choice == e).nonzero().squeeze(1) for e in range(E)]
        outs = [
            expert(xs[i]) * gate[i].to(xs.dtype)[:, None] for i, expert in zip(index, self.experts)
        ]
        rows = torch.cat([i + e * S for e, i in enumerate(index)])
        y = self._buffer_sum(S, rows, torch.cat(outs))
        f = torch.bincount(choice, minlength=E).float() / S  # fraction routed to each expert
        return y, E * (f * scores.mean(0)).sum()  # Switch load-balancing loss


# ----------------------------------------------------------------------------------------------------
def _aux(layer: MoELayer) -> torch.Tensor | float:
    s = layer.stats
    return sum(t for t in (s.cp_loss, s.balance_loss) if t is not None)


@dataclass
class Impl:
    """One implementation under test: fn(x [B, T, D]) -> (y, aux loss), and the modules it trains."""

    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | float]]
    module: nn.Module

    def clear_grads(self) -> None:
        self.module.zero_grad(set_to_none=True)


def _layer_impl(layer: MoELayer) -> Impl:
    return Impl(lambda x: (layer(x), _aux(layer)), layer)


def make_impls(
    mode: str, dim: int, num_experts: int, tokens: int, device: str, seed: int = 0
) -> dict[str, Impl]:
    """name -> Impl; for an MoE mode ours / loop / loop_buffer share the same weights."""
    torch.manual_seed(seed)
    if mode == "dense":
        ffn = FeedForward(dim, 4 * dim).to(device)
        return {"ours": Impl(lambda x: (ffn(x), 0.0), ffn)}
    if tokens % TOKENS_PER_IMAGE:
        raise ValueError(f"tokens={tokens} is not a multiple of {TOKENS_PER_IMAGE} per image")
    pool = tokens // TOKENS_PER_IMAGE  # one pool of all the tokens, as the public code pools
    layer = MoELayer(dim, 4 * dim, num_experts, mode=mode, pool_samples=pool).to(device)
    loop = MoELayer(dim, 4 * dim, num_experts, mode=mode, pool_samples=pool).to(device)
    loop.load_state_dict(layer.state_dict())
    loop.dispatcher = LocalDispatcher(use_loop=True)
    ref = LoopBufferMoE(layer).to(device)
    return {"ours": _layer_impl(layer), "loop": _layer_impl(loop), "loop_buffer": Impl(ref, ref)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fwd_bwd(fn, x: torch.Tensor, g: torch.Tensor, device: str, dtype: torch.dtype) -> float:
    """One forward + backward (loss = <out, g> + aux), wall ms; grads are cleared outside the timing."""
    x.grad = None
    _sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
        out, aux = fn(x)
        loss = (out.float() * g).sum() + aux
    loss.backward()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def peak_memory_mb(fn, x: torch.Tensor, g: torch.Tensor, device: str, dtype: torch.dtype) -> float:
    """Peak allocated memory of one step above the live memory before it (module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, x, g, device, dtype)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fwd_bwd(fn, x, g, device, dtype)
    cur = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += ev.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 2**20


def bench_shape(
    dim: int,
    num_experts: int,
    tokens: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    modes: tuple[str, ...] = MOE_MODES,
    device_name: str = "cpu",
) -> list[dict]:
    """Time every implementation of every mode at one shape, interleaved, and build the JSON cases.

    Each repeat runs every implementation once in a fixed order, so load changes hit them alike;
    ratio_vs_dense and the speedups are medians of the per-repeat paired ratios.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; must be >= 1")
    impls = {("dense", "ours"): make_impls("dense", dim, 0, tokens, device)["ours"]}
    for mode in modes:
        for name, impl in make_impls(mode, dim, num_experts, tokens, device).items():
            impls[(mode, name)] = impl
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens // TOKENS_PER_IMAGE, TOKENS_PER_IMAGE, dim, generator=gen)
    g = torch.randn(x.shape, generator=gen).to(device)
    x = x.to(device).requires_grad_()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in impls}
    for impl in impls.values():  # warm-up (allocator, thread pools, kernel selection)
        fwd_bwd(impl.fn, x, g, device, dtype)
        impl.clear_grads()
    for _ in range(repeats):
        for key, impl in impls.items():
            times[key].append(fwd_bwd(impl.fn, x, g, device, dtype))
            impl.clear_grads()
    mems = {}
    for key, impl in impls.items():
        mems[key] = peak_memory_mb(impl.fn, x, g, device, dtype)
        impl.clear_grads()
    peak = peak_bf16_flops(device_name) if device.startswith("cuda") else None
    dense = times[("dense", "ours")]
    cases = []
    for mode in ("dense", *modes):
        ms = times[(mode, "ours")]
        case = {
            "mode": mode,
            "width": dim,
            "experts": num_experts,
            "tokens": tokens,
            "ms_median": statistics.median(ms),
            "ms_spread": iqr(ms),
            "peak_mem_mb": round(mems[(mode, "ours")], 2),
            "ratio_vs_dense": statistics.median(a / d for a, d in zip(ms, dense)),
            "speedup_vs_loop_buffer": None,
            "flop_floor": flop_floor(mode, dim, num_experts),
        }
        if mode != "dense":
            for name, key in (
                ("loop_buffer", "speedup_vs_loop_buffer"),
                ("loop", "speedup_vs_loop"),
            ):
                case[key] = statistics.median(r / a for r, a in zip(times[(mode, name)], ms))
        if device.startswith("cuda"):
            tflops = (
                tokens * flops_per_token(mode, dim, num_experts) / (case["ms_median"] * 1e-3) / 1e12
            )
            case["tflops"] = tflops
            case["mfu"] = tflops * 1e12 / peak if peak else None
        cases.append(case)
    return cases


def profile_shape(
    dim: int,
    num_experts: int,
    tokens: int,
    modes: tuple[str, ...] = MOE_MODES,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    steps: int = 2,
    rows: int = 25,
) -> dict[str, str]:
    """torch.profiler tables (self time by op and input shape): the dense FFN and each of ``modes``.

    One warm-up step, then ``steps`` profiled forward + backward steps each (grads cleared between
    steps, outside nothing: the profile is for where time goes, not for timing).
    """
    from torch.profiler import ProfilerActivity, profile

    impls = {"dense": make_impls("dense", dim, 0, tokens, device)["ours"]}
    for mode in modes:
        impls[mode] = make_impls(mode, dim, num_experts, tokens, device)["ours"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens // TOKENS_PER_IMAGE, TOKENS_PER_IMAGE, dim, generator=gen)
    g = torch.randn(x.shape, generator=gen).to(device)
    x = x.to(device).requires_grad_()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    tables = {}
    for name, impl in impls.items():
        fwd_bwd(impl.fn, x, g, device, dtype)
        impl.clear_grads()
        with profile(activities=acts, record_shapes=True) as prof:
            for _ in range(steps):
                fwd_bwd(impl.fn, x, g, device, dtype)
                impl.clear_grads()
        tables[name] = prof.key_averages(group_by_input_shape=True).table(
            sort_by=sort, row_limit=rows, max_name_column_width=40, max_shapes_column_width=60
        )
    return tables


def iqr(values: list[float]) -> float:
    """Interquartile range (q3 - q1, inclusive method); 0 for fewer than 2 values."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def validate_result(result: dict) -> None:
    """Raise ValueError unless ``result`` has the JSON shape of issue 8 (plus the optional keys)."""
    for i, c in enumerate(check_cases(result, REQUIRED_KEYS, OPTIONAL_KEYS)):
        if c["mode"] not in ("dense", *MOE_MODES):
            raise ValueError(f"case {i}: mode {c['mode']!r}")
        for k in ("ms_median", "ms_spread", "peak_mem_mb", "ratio_vs_dense"):
            if not isinstance(c[k], (int, float)) or c[k] < 0:
                raise ValueError(f"case {i}: {k}={c[k]!r} is not a non-negative number")
        if (c["speedup_vs_loop_buffer"] is None) != (c["mode"] == "dense"):
            raise ValueError(f"case {i}: speedup_vs_loop_buffer must be null exactly for dense")
