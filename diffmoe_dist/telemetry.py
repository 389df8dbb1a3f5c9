"""Expert telemetry: where the MoE layers spend compute, at training and at sampling.

Per MoE layer, accumulated locally over the forwards since the last ``reduce`` (no collective ever
runs while accumulating, so nothing happens inside a model forward):

  tokens_per_expert     [E]   (token, expert) pairs each expert processed
  capacity              pairs / tokens (realised C)
  pred_precision/recall the capacity predictor's mask (sigmoid > threshold) against the routing mask:
                        precision = |pred & route| / |pred|, recall = |pred & route| / |route|
  compute_by_t_bucket   [10]  mean experts per token for tokens of samples whose t falls in bucket b
  compute_by_class      [K+1] the same by class label (index K = the null label of CFG)

Tokens are sample-major: a forward on B samples leaves ``token_pairs`` [N = B*T], token n belongs to
sample n // T. Time convention (transport/path.py): t = 0 noise, t = 1 data; bucket b holds
t in [b/10, (b+1)/10), t = 1 goes to the last bucket.

The one home of MoE statistics: the trainer (``log_metrics`` at log steps: also the thresholds and
the dispatchers' byte counters), the sampler (inference/capacity.py ``CapacityMeter``: C_infer and
sample_report.json) and the studies read these counters; nothing else walks the model for them.

Besides, per rank: wall time in the expert dispatcher's collectives (``comm_time_s`` of the
all-to-all dispatchers), step time, and peak RSS (``resource.getrusage``). ``reduce`` packs every
counter into one float64 tensor and all-reduces it once (SUM) on the group it is given; integer
counts stay exact below 2**53. Sums over ranks equal the single-process numbers for the same global
batch, whatever the layout.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from diffmoe_dist.models.moe import MoELayer, MoEStats
from diffmoe_dist.parallel.dispatch import a2a_bytes_summary
from diffmoe_dist.parallel.distributed import all_reduce_host

NUM_T_BUCKETS = 10


def t_bucket(t: torch.Tensor, num_buckets: int = NUM_T_BUCKETS) -> torch.Tensor:
    """t [B] in [0, 1] -> bucket index [B] (long) in [0, num_buckets): floor(t * n), t = 1 -> n - 1."""
    return (t.detach().double() * num_buckets).floor().long().clamp_(0, num_buckets - 1)


def precision_recall(pred: torch.Tensor, route: torch.Tensor) -> tuple[float | None, float | None]:
    """Precision and recall of a predicted [N, E] bool mask against the routing mask (None if 0/0)."""
    tp = float((pred & route).sum())
    n_pred, n_route = float(pred.sum()), float(route.sum())
    return (tp / n_pred if n_pred else None), (tp / n_route if n_route else None)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def peak_mem_mb(device: torch.device | None = None) -> float:
    """Peak memory of this rank in MiB: CUDA ``max_memory_allocated`` on a GPU, else peak RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def collect_comm_time(model: nn.Module) -> float:
    """Seconds this rank spent in its dispatchers' collectives since the last call (then zeroed)."""
    total = 0.0
    for m in model.modules():
        d = getattr(m, "dispatcher", None)
        if d is not None and hasattr(d, "comm_time_s"):
            total += float(d.comm_time_s)
            d.comm_time_s = 0.0
    return total


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[float | None]:
    return [(float(n) / float(d)) if d > 0 else None for n, d in zip(num, den)]


class ExpertTelemetry:
    """Counters of one run; ``add`` after every forward, ``reduce`` + ``summary`` at log time."""

    def __init__(
        self,
        num_classes: int,
        world_size: int = 1,
        rank: int = 0,
        num_buckets: int = NUM_T_BUCKETS,
    ) -> None:
        self.num_labels = num_classes + 1  # + the null label (index num_classes)
        self.num_buckets, self.world_size, self.rank = num_buckets, world_size, rank
        self.num_layers = self.num_experts = 0
        self._reduced = False
        # The per-forward counters live on the device of the stats they count (set by add), so a
        # training step does no device-to-host copy for them; reduce() reads them at log steps.
        self.device = torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        L, E, nb, K = self.num_layers, self.num_experts, self.num_buckets, self.num_labels
        dev = self.device

        def z(*shape: int, dtype: torch.dtype, device: torch.device = dev) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.counts = z(L, E, dtype=torch.float64)  # pairs per expert
        self.sizes = z(L, 2, dtype=torch.float64)  # (pairs, tokens)
        self.pr = z(L, 3, dtype=torch.float64)  # (true positives, predicted, routed)
        self.has_pred = z(L, dtype=torch.float64)  # 1 where the layer has a predictor mask
        self.bucket = z(L, 2, nb, dtype=torch.float64)  # (pairs, tokens) per t bucket
        self.label = z(L, 2, K, dtype=torch.float64)  # (pairs, tokens) per label
        # host-side numbers: wall times and peak memory are Python floats to begin with
        z = torch.zeros  # type: ignore[assignment]
        self.timing = z(3, dtype=torch.float64)  # (comm seconds, step seconds, steps)
        self.peak_mb = z(self.world_size, dtype=torch.float64)  # one slot per rank
        self._reduced = False

    def _ensure_shape(self, stats: Sequence[MoEStats]) -> None:
        E = max((s.num_experts for s in stats), default=0)
        if (len(stats), E) != (self.num_layers, self.num_experts):
            if self.sizes.sum() > 0:
                raise ValueError(
                    f"telemetry: the model has {len(stats)} MoE layers x {E} experts, but "
                    f"{self.num_layers} x {self.num_experts} were accumulated"
                )
            self.num_layers, self.num_experts = len(stats), E
            self.reset()

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def add(
        self,
        stats: Sequence[MoEStats],
        t: torch.Tensor,
        y: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        """One forward on B samples: t [B] in [0, 1], y [B] labels (num_classes = null).

        ``valid`` [B] (or [B'] with B' dividing B, tiled: CFG's [cond; uncond] batch) drops padding
        samples; their tokens count nowhere.
        """
        self._ensure_shape(stats)
        dev = t.device
        if self.counts.device != dev:  # follow the model's device (copies whatever was counted)
            self.device = dev
            for name in ("counts", "sizes", "pr", "has_pred", "bucket", "label"):
                setattr(self, name, getattr(self, name).to(dev))
        B = t.shape[0]
        if y.shape[0] != B:
            raise ValueError(f"telemetry: t has {B} samples but y has {y.shape[0]}")
        keep = (
            torch.ones(B, dtype=torch.bool, device=dev)
            if valid is None
            else valid.detach().to(dev).bool()
        )
        if keep.numel() != B:
            if keep.numel() == 0 or B % keep.numel():
                raise ValueError(f"telemetry: valid has {keep.numel()} entries for {B} samples")
            keep = keep.repeat(B // keep.numel())
        bucket = t_bucket(t, self.num_buckets)
        label = y.detach().to(dev).long()
        # Label bounds, before any counter changes, without reading the labels on the host (a read
        # per forward is a host sync the step's budget does not allow): CPU index_add_ checks its
        # index itself, so a throwaway add raises. On CUDA index_add_ asserts on the device instead.
        if label.device.type == "cpu":
            try:
                torch.zeros(self.num_labels, dtype=torch.float64).index_add_(
                    0, label, torch.ones(B, dtype=torch.float64)
                )
            except IndexError as e:
                raise ValueError(f"telemetry: labels outside [0, {self.num_labels})") from e
        w = keep.double()
        for i, s in enumerate(stats):
            if s.token_pairs is None:  # dense FFN: one expert per token
                per_tok = torch.ones(s.tokens, dtype=torch.float64, device=dev)
            else:
                per_tok = s.token_pairs.detach().double()
            if per_tok.numel() % B:
                raise ValueError(
                    f"telemetry: layer {i} routed {per_tok.numel()} tokens for {B} samples"
                )
            T = per_tok.numel() // B
            pairs = per_tok.view(B, T).sum(1) * w  # [B] pairs of each kept sample
            toks = torch.full((B,), float(T), dtype=torch.float64, device=dev) * w
            self.sizes[i, 0] += pairs.sum()
            self.sizes[i, 1] += toks.sum()
            self.bucket[i, 0].index_add_(0, bucket, pairs)
            self.bucket[i, 1].index_add_(0, bucket, toks)
            self.label[i, 0].index_add_(0, label, pairs)
            self.label[i, 1].index_add_(0, label, toks)
            if s.route_mask is not None:
                route = s.route_mask.detach().view(B, T, -1) & keep[:, None, None]
                self.counts[i, : route.shape[-1]] += route.sum((0, 1)).double()
                if s.pred_mask is not None:
                    pred = s.pred_mask.detach().view(B, T, -1) & keep[:, None, None]
                    self.pr[i] += torch.stack([(pred & route).sum(), pred.sum(), route.sum()])
                    self.has_pred[i] = 1.0
            elif s.expert_counts is not None and valid is None:
                self.counts[i, : s.expert_counts.numel()] += s.expert_counts.double()

    def add_step(self, step_time_s: float, model: nn.Module | None = None) -> None:
        """End of one training step: its wall time and the dispatchers' collective time."""
        comm = collect_comm_time(model) if model is not None else 0.0
        self.timing += torch.tensor([comm, float(step_time_s), 1.0], dtype=torch.float64)

    # ------------------------------------------------------------------------------------------------
    def reduce(self, group: dist.ProcessGroup | None, device: torch.device | None = None) -> None:
        """Sum every counter over the ranks of ``group`` with ONE all-reduce (call on every rank)."""
        self.peak_mb.zero_()
        self.peak_mb[self.rank] = peak_mem_mb(device)
        # The log step reads the device counters: one copy to the host, then summary() is host-only.
        for name in ("counts", "sizes", "pr", "has_pred", "bucket", "label"):
            setattr(self, name, getattr(self, name).cpu())
        parts = [self.counts, self.sizes, self.pr, self.has_pred, self.bucket, self.label]
        parts += [self.timing, self.peak_mb]
        if group is not None:
            packed = torch.cat([p.flatten() for p in parts])
            packed = all_reduce_host(packed, group, device or torch.device("cpu"))
            off = 0
            for p in parts:
                p.copy_(packed[off : off + p.numel()].view_as(p))
                off += p.numel()
            self.has_pred.clamp_(max=1.0)
        self._reduced = True

    def summary(self, include_counts: bool = True) -> dict[str, Any]:
        """The reduced numbers as JSON-ready values (see the module docstring for each key)."""
        out: dict[str, Any] = {}
        L = self.num_layers
        if L:
            if include_counts:
                out["tokens_per_expert"] = self.counts.long().tolist()
                out["capacity_per_layer"] = _ratio(self.sizes[:, 0], self.sizes[:, 1])
            prec = [
                _ratio(self.pr[i, :1], self.pr[i, 1:2])[0] if self.has_pred[i] else None
                for i in range(L)
            ]
            rec = [
                _ratio(self.pr[i, :1], self.pr[i, 2:3])[0] if self.has_pred[i] else None
                for i in range(L)
            ]
            out["pred_precision_per_layer"], out["pred_recall_per_layer"] = prec, rec
            out["pred_precision"] = _mean(prec)
            out["pred_recall"] = _mean(rec)
            out["compute_by_t_bucket"] = [_ratio(*self.bucket[i]) for i in range(L)]
            out["compute_by_class"] = [_ratio(*self.label[i]) for i in range(L)]
            out["t_bucket_tokens"] = self.bucket[0, 1].long().tolist()
            out["class_tokens"] = self.label[0, 1].long().tolist()
            skew = [load_skew(c) for c in self.counts]
            out["expert_load_skew_per_layer"] = skew
            out["expert_load_skew"] = max((s for s in skew if s is not None), default=None)
        comm, step, steps = self.timing.tolist()
        if steps > 0:
            # steps was summed over ranks too: these are per step, mean over ranks
            out["step_time_s"] = step / steps
            out["a2a_time_s"] = comm / steps
            out["a2a_share"] = comm / step if step > 0 else None
        if self._reduced:
            out["peak_mem_mb"] = float(self.peak_mb.max())
            out["peak_mem_mb_per_rank"] = [round(v, 1) for v in self.peak_mb.tolist()]
        return out

    def log_metrics(
        self,
        group: dist.ProcessGroup | None,
        device: torch.device | None = None,
        model: nn.Module | None = None,
    ) -> dict[str, Any]:
        """The MoE part of one metrics.jsonl record: reduce (the one all-reduce of a log step) +
        summary + reset. With ``model``: its MoE thresholds (the same on every rank) and ``a2a_bytes``
        (this rank's dispatcher byte counters since the last log, then zeroed; no collective)."""
        self.reduce(group, device)
        out = self.summary()
        self.reset()
        if model is not None:
            layers = [m for m in model.modules() if isinstance(m, MoELayer)]
            if layers:
                out["thresholds"] = [m.thresholds.tolist() for m in layers]
            a2a = a2a_bytes_summary(model)
            if a2a:
                out["a2a_bytes"] = a2a
        return out


def load_skew(counts: Iterable[float] | torch.Tensor) -> float | None:
    """max / mean tokens per expert (1.0 = perfectly balanced); None when no token was routed."""
    c = torch.as_tensor(list(counts) if not isinstance(counts, torch.Tensor) else counts).double()
    if c.numel() == 0 or float(c.sum()) == 0:
        return None
    return float(c.max() / c.mean())


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None
