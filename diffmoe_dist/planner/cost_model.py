"""Cluster planner: predicted step time, all-to-all share and memory per GPU of a DiffMoE layout.

Everything is per GPU and per training step (forward + backward + gradient sync), for a layout of
``nodes`` x ``gpus_per_node`` GPUs, expert-parallel degree ``ep`` (ep groups are consecutive ranks,
as parallel/layout.py builds them), global batch G, pool of ``pool_samples`` images, T = 256 tokens
per image. Units: bytes, GB/s (1e9 bytes/s), milliseconds.

Compute. The model's FLOPs are models/flops.py's (``forward_flops_per_sample`` of the registry
model at this pool size, x 3 for forward + backward, the trainer's MFU convention): the MoE FFNs
(experts, router, capacity predictor) apart from the rest (embedding, adaLN, attention, dense FFNs,
final layer), each divided by an achieved FLOP/s: measured by bench_moe.py (``calibrate``: the
dense FFN's rate for the dense parts, the diffmoe layer's rate for the MoE FFNs) or a default of 40%
of an H100's bf16 peak. Parameter counts are models/params.py's (the model built on the meta device).

Communication per MoE layer per step, bytes this rank sends (parallel/dispatch.py counts the same):
  tokens  4 N C D b (ep - 1) / ep     dispatch + return, forward + backward; N tokens on this rank,
                                      b bytes per element; (ep-1)/ep = share of experts elsewhere
  scores  gathers x N E 4 (span - 1)  pool scores (and predictor probabilities: gathers = 2 for
                                      diffmoe) all-gathered when a pool spans ``span`` ranks
  counts  (E / ep) 8 (ep - 1)         per-expert counts before each dispatch, only when a pool spans
                                      ranks (pools on one rank: static splits, nothing exchanged)
The share of destinations inside the node goes at NVLink speed, the rest at InfiniBand speed, one after
the other (no overlap), plus a latency per collective. Gradient sync: ring all-reduce, 2 (n-1)/n x the
gradient bytes (4 per parameter, 2 with ``grad_reduce_dtype="bf16"``) over the group's bus bandwidth
(dense: whole world; experts: expert-data-parallel group), once per step; across nodes that is the
InfiniBand of the group's GPUs in one node (one ring per NIC, as NCCL runs multi-rail), in a node
NVLink. What the trainer does
(parallel/grad_reduce.py GradReducer):
  overlap=True   the reduction runs during the last micro-batch's backward (2/3 of its compute);
                 exposed = max(sync - backward, sync x last-bucket share), the last bucket
                 (``bucket_mb``, the first layers' gradients) being issued when backward ends
  overlap=False  exposed = the whole sync (train.grad_reduce=flat)
Gradient accumulation (``accum`` micro-batches per step, train.grad_accum_steps): compute and
all-to-all scale with accum at micro-batch G / (W accum), the sync does not.
Rank skew (``rank_noise``): every collective above is synchronous across its group, so each one
waits for the slowest rank to arrive. The step is cut into ``sync_points`` segments by its
synchronising collectives (accum x MoE layers x collectives per layer, + 3: the end of the gradient
reduction, the threshold and the grad-norm all-reduces); when each rank's compute in a segment
varies independently by a relative standard deviation sigma (OS and load noise on a shared CPU,
clock and thermal jitter, stragglers on a GPU cluster; routing adds none: under expert choice with
pools on one rank every rank gets exactly k tokens per expert), every segment lasts as long as its
slowest rank's, and the step waits in all:
  skew = sigma x e(W) x compute,   e(W) = E[max of W standard normals] (0, 0.56, 1.03, 1.42 for
                                   W = 1, 2, 4, 8; 2.34 for 64)
added to the step and counted as exposed communication (it is time spent waiting in collectives).
A whole step's busy time then varies between ranks by only sigma / sqrt(sync_points) (the segments'
noise averages out), which is how planner/check.py calibrates sigma from per-rank step times.
sigma = 0 (the default) is ranks in lockstep.
These are a model's assumptions, not measurements.

Memory per GPU: parameters this rank holds (dense + E/ep experts of each MoE layer) x 20 bytes (fp32
weights, gradients, two AdamW moments, fp32 EMA) + activations of the micro-batch, bf16, no recompute,
D (34 + 5 heads T / D) bytes per token per block (Megatron-LM's estimate for a transformer layer).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from diffmoe_dist.bench.moe_bench import TOKENS_PER_IMAGE, flops_per_token
from diffmoe_dist.config import Config, from_dict
from diffmoe_dist.models.flops import forward_flops_per_sample
from diffmoe_dist.models.params import count_config_params
from diffmoe_dist.models.registry import REGISTRY

# The models the planner can lay out: the registry's DiffMoE sizes (its routing with a pool).
MODELS: tuple[str, ...] = tuple(n for n in REGISTRY if REGISTRY[n]["moe"]["mode"] == "diffmoe")
MOE_PARTS = ("experts", "router", "predictor")  # flops.py parts computed by the MoE FFNs
H100_BF16 = 989.4e12
DEFAULT_RATE = 0.4 * H100_BF16  # FLOP/s when no benchmark JSON is given
BYTES_PER_PARAM = 20  # fp32 weight + grad + AdamW m, v + EMA copy


@dataclass(frozen=True)
class Links:
    nvlink_gbps: float = 450.0  # per GPU, one direction
    ib_gbps: float = 50.0  # per GPU (one 400 Gb/s NIC per GPU); 25 for 200 Gb/s
    latency_us: float = 15.0  # per collective

    def __post_init__(self) -> None:
        for name in ("nvlink_gbps", "ib_gbps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r}: a bandwidth must be a positive number of GB/s")
        if self.latency_us < 0:
            raise ValueError(f"latency_us={self.latency_us}: must be >= 0")


@dataclass(frozen=True)
class Rates:
    """Achieved FLOP/s for the dense parts and for the MoE FFNs (``calibrate`` from a bench JSON)."""

    dense_flops: float = DEFAULT_RATE
    moe_flops: float = DEFAULT_RATE
    source: str = "default: 40% of H100 bf16 peak"


@dataclass
class Plan:
    model: str
    nodes: int
    gpus_per_node: int
    ep: int
    micro_batch: int
    pool_span: int
    compute_ms: float
    a2a_ms: float
    grad_sync_ms: float
    skew_ms: float  # waiting for the slowest rank at the collectives (rank_noise)
    sync_points: int  # synchronising collectives per step (segments of the rank-skew model)
    step_ms: float
    a2a_share: float
    a2a_bytes_per_layer: dict[str, float]
    params_per_gpu: float
    memory_gb: float
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
def model_config(model: str, pool_samples: int = 64) -> Config:
    """The registry's ``model`` at 256 px (32x32x4 latents, patch 2: 256 tokens per image)."""
    if model not in MODELS:
        raise ValueError(f"model {model!r}; known: {', '.join(MODELS)}")
    cfg = from_dict({"model": {"name": model}, "moe": {"pool_samples": pool_samples}})
    tokens = (cfg.model.input_size // cfg.model.patch_size) ** 2
    if tokens != TOKENS_PER_IMAGE:  # the byte counts below assume it
        raise ValueError(f"{model}: {tokens} tokens per image, the planner assumes 256")
    return cfg


def param_counts(model: str) -> dict[str, int]:
    """{'dense': parameters every rank holds, 'expert': all experts' parameters} of a registry
    DiffMoE (models/params.py on the model built on the meta device)."""
    return dict(_param_counts(model))


@functools.cache
def _param_counts(model: str) -> tuple[tuple[str, int], ...]:
    pc = count_config_params(model_config(model))  # ~0.1-0.3 s a build: once per model
    return (("dense", pc["total"] - pc["expert"]), ("expert", pc["expert"]))


def train_flops_per_sample(model: str, pool_samples: int = 64) -> dict[str, float]:
    """{'dense': FLOPs of the parts every rank computes, 'moe': of the MoE FFNs} per training sample
    (forward + backward = 3 x models/flops.py's forward count)."""
    cfg = model_config(model, pool_samples)
    parts = forward_flops_per_sample(cfg.model, cfg.moe)
    moe = sum(parts[k] for k in MOE_PARTS)
    return {"dense": 3.0 * (parts["total"] - moe), "moe": 3.0 * moe}


def moe_layer_bytes(
    tokens: int,
    dim: int,
    num_experts: int,
    ep: int,
    pool_span: int = 1,
    capacity: float = 1.0,
    elem_bytes: int = 2,
    score_gathers: int = 2,
) -> dict[str, float]:
    """Bytes one rank sends for one MoE layer in one training step (module docstring)."""
    if ep < 1 or num_experts % ep:
        raise ValueError(f"ep={ep} must be >= 1 and divide num_experts={num_experts}")
    if pool_span < 1 or ep % pool_span:
        raise ValueError(f"pool_span={pool_span} must divide ep={ep}")
    out = {
        "tokens": 4 * tokens * capacity * dim * elem_bytes * (ep - 1) / ep,
        "scores": score_gathers * tokens * num_experts * 4 * (pool_span - 1),
        # pools on one rank: every split is k x experts per rank, known before the step
        "counts": (num_experts // ep) * 8 * (ep - 1) if pool_span > 1 else 0,
    }
    out["total"] = sum(out.values())
    return out


def calibrate(bench: dict, dim: int | None = None) -> Rates:
    """Achieved FLOP/s from a bench_moe.py JSON: the case with most tokens (width nearest ``dim``)."""
    cases = bench.get("cases") if isinstance(bench, dict) else None
    if not cases:
        raise ValueError(
            "benchmark JSON has no 'cases' (expected the output of bench_moe.py --json)"
        )

    def rate(mode: str) -> tuple[float, dict]:
        cs = [c for c in cases if c["mode"] == mode and c["ms_median"] > 0]
        if not cs:
            raise ValueError(f"benchmark JSON has no {mode!r} case")
        c = max(cs, key=lambda c: (-abs(c["width"] - (dim or c["width"])), c["tokens"]))
        f = c["tokens"] * flops_per_token(mode, c["width"], c["experts"])
        return f / (c["ms_median"] * 1e-3), c

    dense, cd = rate("dense")
    moe, cm = rate("diffmoe")
    src = f"{bench.get('device', '?')}: dense D={cd['width']} N={cd['tokens']}, "
    src += f"diffmoe D={cm['width']} E={cm['experts']} N={cm['tokens']}"
    return Rates(dense, moe, src)


def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals] (0 for n = 1), by numerical integration of
    x d/dx Phi(x)^n over [-10, 10] (error below 1e-6 for n <= 10^4)."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one rank")
    if n == 1:
        return 0.0
    h, total = 1e-3, 0.0
    for i in range(-10_000, 10_000):
        x = (i + 0.5) * h
        cdf = 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
        total += x * n * cdf ** (n - 1) * math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) * h
    return total


_EXPECTED_MAX: dict[int, float] = {}


def _expected_max_cached(n: int) -> float:
    if n not in _EXPECTED_MAX:
        _EXPECTED_MAX[n] = expected_max_normal(n)
    return _EXPECTED_MAX[n]


def _split_time(nbytes: float, group: int, gpus_per_node: int, links: Links) -> float:
    """Seconds to send ``nbytes`` spread evenly over the other ``group - 1`` ranks of a consecutive
    group: destinations in the same node at NVLink speed, the rest at InfiniBand speed."""
    if group <= 1 or nbytes == 0:
        return 0.0
    in_node = min(group, gpus_per_node) - 1
    intra = nbytes * in_node / (group - 1)
    return intra / (links.nvlink_gbps * 1e9) + (nbytes - intra) / (links.ib_gbps * 1e9)


def _allreduce_time(
    nbytes: float, n: int, spans_nodes: bool, links: Links, per_node: int = 1
) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` ranks, ``per_node`` of them in each node. Across
    nodes NCCL runs one ring per NIC (multi-rail), each crossing InfiniBand once per node, so the bus
    bandwidth is the node's NICs of the group's GPUs (per_node x ib), capped by NVLink."""
    if n <= 1:
        return 0.0
    bw = min(links.nvlink_gbps, per_node * links.ib_gbps) if spans_nodes else links.nvlink_gbps
    return 2 * (n - 1) / n * nbytes / (bw * 1e9) + links.latency_us * 1e-6


def plan(
    model: str,
    nodes: int,
    gpus_per_node: int,
    ep: int,
    global_batch: int = 256,
    pool_samples: int = 64,
    links: Links | None = None,
    rates: Rates | None = None,
    elem_bytes: int = 2,
    overlap: bool = True,
    grad_reduce_dtype: str = "fp32",
    accum: int = 1,
    bucket_mb: float = 25.0,
    rank_noise: float = 0.0,
) -> Plan:
    """Predict one training step of ``model`` on this layout (ValueError naming the numbers).

    ``rank_noise``: relative standard deviation of one rank's compute time (module docstring,
    "Rank skew"); 0 = ranks in lockstep."""
    if not (math.isfinite(rank_noise) and rank_noise >= 0):
        raise ValueError(f"rank_noise={rank_noise}: must be a finite number >= 0")
    if grad_reduce_dtype not in ("fp32", "bf16"):
        raise ValueError(f"grad_reduce_dtype={grad_reduce_dtype!r}; expected fp32 or bf16")
    if accum < 1:
        raise ValueError(f"accum={accum}; must be >= 1")
    links, rates = links or Links(), rates or Rates()
    cfg = model_config(model, pool_samples)
    depth, D, heads, E = (
        cfg.model.depth,
        cfg.model.hidden_size,
        cfg.model.num_heads,
        cfg.moe.num_experts,
    )
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes={nodes}, gpus_per_node={gpus_per_node}: must be >= 1")
    W = nodes * gpus_per_node
    if ep < 1 or E % ep or W % ep:
        raise ValueError(f"ep={ep} must divide num_experts={E} and world size {W}")
    if global_batch % (W * accum):
        raise ValueError(
            f"global_batch={global_batch} is not divisible by world size {W} x accum {accum}"
        )
    b = global_batch // (W * accum)  # samples per rank per forward
    if pool_samples % b == 0:
        span = pool_samples // b
        if ep % span:
            raise ValueError(
                f"pool of {pool_samples} samples spans {span} ranks (micro-batch {b}); "
                f"the span must divide ep={ep}"
            )
    elif b % pool_samples == 0:
        span = 1
    else:
        raise ValueError(f"pool_samples={pool_samples} and micro-batch {b} do not tile")
    T, N = TOKENS_PER_IMAGE, b * TOKENS_PER_IMAGE
    n_moe = depth // 2
    # compute (models/flops.py)
    fl = train_flops_per_sample(model, pool_samples)
    micro_s = b * (fl["dense"] / rates.dense_flops + fl["moe"] / rates.moe_flops)
    compute_s = accum * micro_s
    # all-to-all (per MoE layer) and score gathers
    by = moe_layer_bytes(N, D, E, ep, span, elem_bytes=elem_bytes)
    n_coll = (5 if ep > 1 else 0) + (2 if span > 1 else 0)  # 4 token a2a + counts, 2 gathers
    per_layer = _split_time(by["tokens"] + by["counts"], ep, gpus_per_node, links)
    per_layer += _split_time(by["scores"], span, gpus_per_node, links)
    per_layer += n_coll * links.latency_us * 1e-6
    a2a_s = accum * n_moe * per_layer
    # gradient sync, once per step: dense over the world, experts over the edp group
    pc = param_counts(model)
    edp = W // ep
    gb = 2 if grad_reduce_dtype == "bf16" else 4
    sync_s = _allreduce_time(gb * pc["dense"], W, nodes > 1, links, gpus_per_node)
    edp_per_node = max(1, gpus_per_node // ep)  # ranks of one edp group inside a node
    edp_spans_nodes = nodes > 1 and edp > edp_per_node
    sync_s += _allreduce_time(gb * pc["expert"] / ep, edp, edp_spans_nodes, links, edp_per_node)
    grad_s = sync_s  # exposed part of it
    if overlap and sync_s > 0:
        grad_bytes = gb * (pc["dense"] + pc["expert"] / ep)
        last_bucket = min(1.0, bucket_mb * 2**20 / grad_bytes)
        grad_s = max(sync_s - micro_s * 2 / 3, sync_s * last_bucket)
    # memory
    params_gpu = pc["dense"] + pc["expert"] / ep
    act = N * depth * D * (34 + 5 * heads * T / D)
    memory = params_gpu * BYTES_PER_PARAM + act
    # every collective waits for the slowest of the W ranks (module docstring)
    skew_s = rank_noise * _expected_max_cached(W) * compute_s
    step_s = compute_s + a2a_s + grad_s + skew_s
    sync_points = accum * n_moe * n_coll + 3  # + reduction end, threshold and grad-norm reductions
    notes = []
    if ep > gpus_per_node:
        notes.append(f"ep={ep} > {gpus_per_node} GPUs per node: all-to-all crosses InfiniBand")
    return Plan(
        model=model,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        ep=ep,
        micro_batch=b,
        pool_span=span,
        compute_ms=compute_s * 1e3,
        a2a_ms=a2a_s * 1e3,
        grad_sync_ms=grad_s * 1e3,
        skew_ms=skew_s * 1e3,
        sync_points=sync_points,
        step_ms=step_s * 1e3,
        a2a_share=a2a_s / step_s,
        a2a_bytes_per_layer=by,
        params_per_gpu=params_gpu,
        memory_gb=memory / 1e9,
        notes=notes,
    )


def recommend(plans: list[Plan], memory_limit_gb: float = 80.0) -> Plan:
    """The fastest plan that fits in memory (ValueError when none does)."""
    fits = [p for p in plans if p.memory_gb <= memory_limit_gb]
    if not fits:
        best = min(plans, key=lambda p: p.memory_gb)
        raise ValueError(
            f"no layout fits {memory_limit_gb} GB per GPU (smallest: ep={best.ep}, "
            f"{best.memory_gb:.1f} GB)"
        )
    return min(fits, key=lambda p: (p.step_ms, p.ep))
