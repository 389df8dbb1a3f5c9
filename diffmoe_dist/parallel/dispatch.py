"""The all-to-all dispatcher: tokens travel to the rank holding their expert and back.

One instance per MoE layer (installed by parallelize_model; the model code is unchanged). In
``run_experts`` the layer hands over x [M, D] grouped by *global* expert ascending with counts [E];
expert e lives on ep rank e // E_local. Per forward:

    1. counts    all_to_all_single of counts.view(ep, E_local)      -> recv_counts [ep, E_local]
    2. tokens    all_to_all_single(x, send rows per rank)          rows ordered (source, expert)
    3. permute   stable sort by local expert                        rows ordered (expert, source)
    4. experts   StackedExperts(x, recv_counts.sum(0))
    5. return    inverse permutation, all_to_all_single back        [M, D] in the layer's order

Static shapes (``static=True``: training under expert choice with pools on one rank, so every
expert takes exactly c rows from every rank): no step 1, every split is E_local * c, and step 3 is
a transpose; nothing is read from the device. Otherwise the exchanged counts are read once
(``recv_counts.tolist()``), the only host sync of the dispatcher; the layer itself reads its own
counts once (models/moe.py).

Both token all-to-alls are autograd-aware (backward = the reverse all-to-all). The combine weight is
applied by the layer on the token's own rank, so router gradients never travel.

When a training pool spans ``pool_span`` ranks, ``gather_pool`` all-gathers the [N_local, E] scores
(or predictor probabilities) of the pool's ranks in global token order, so every rank of the pool
computes the same top-k. Every byte sent to or received from another rank is logged in
``bytes_log[layer_id]`` (tokens forward and backward, scores, counts) until ``reset()``.
Wall time spent inside these collectives (forward, and the token all-to-alls' backward) accumulates
in ``comm_time_s`` (seconds, not reset by ``reset()``; diffmoe_dist/telemetry.py reads and zeroes it).
On CUDA it is measured with CUDA events on the current stream (``CollectiveTimer``): an NCCL call returns
once it is queued, so a host clock would read about 0 and count the wait as compute.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
from torch.distributed import ProcessGroup

from diffmoe_dist.models.moe import StackedExperts
from diffmoe_dist.parallel.comm import (
    ByteCounter,
    all_gather_rows,
    all_to_all_single,
    exchange_counts,
)


class CollectiveTimer:
    """Time spent in collectives: ``time.perf_counter`` on CPU, CUDA events on a GPU.

    ``start(device)`` / ``stop(token)`` bracket one collective. On CUDA both ends are events recorded
    on the current stream, which waits for the NCCL stream when the collective completes; the
    elapsed times are read (one synchronisation on the last event) only when ``seconds`` is asked
    for, i.e. at the trainer's log or step boundary, never inside the forward.
    """

    def __init__(self) -> None:
        self.host_s = 0.0
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self, device: torch.device) -> tuple[str, object]:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ("cuda", ev)
        return ("host", time.perf_counter())

    def stop(self, token: tuple[str, object]) -> None:
        kind, begin = token
        if kind == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((begin, end))  # type: ignore[arg-type]
        else:
            self.host_s += time.perf_counter() - begin  # type: ignore[operator]

    def seconds(self) -> float:
        if self.pending:
            self.pending[-1][1].synchronize()  # events complete in stream order
            self.host_s += sum(a.elapsed_time(b) for a, b in self.pending) / 1e3  # ms -> s
            self.pending.clear()
        return self.host_s

    def reset(self) -> None:
        self.host_s, self.pending = 0.0, []


BYTE_KEYS = (
    "tokens_sent",  # forward: dispatch + return all-to-all
    "tokens_recv",
    "tokens_bwd_sent",  # backward: the two reverse all-to-alls of the gradients
    "tokens_bwd_recv",
    "scores_sent",  # pool scores / probabilities all-gathered across a spanning pool
    "scores_recv",
    "counts_sent",  # per-expert counts exchanged before every dispatch
    "counts_recv",
    "index_sent",  # dedup_tokens: int32 slot of each (token, expert) pair in the unique tokens
    "index_recv",
)


class AllToAllDispatcher:
    """Dispatcher protocol (models/moe.py) over an expert-parallel group of ``ep`` ranks."""

    def __init__(
        self,
        ep: int,
        ep_group: ProcessGroup | None,
        pool_span: int = 1,
        pool_index: int = 0,
        pool_group: ProcessGroup | None = None,
        layer_id: int = 0,
        use_loop: bool = False,
        dedup_tokens: bool = False,
    ):
        if ep > 1 and ep_group is None:
            raise ValueError(f"ep={ep} needs an ep_group")
        if pool_span > 1 and pool_group is None:
            raise ValueError(f"pool_span={pool_span} needs a pool_group")
        if ep % pool_span or not 0 <= pool_index < pool_span:
            raise ValueError(
                f"ep={ep}, pool_span={pool_span}, pool_index={pool_index}: inconsistent"
            )
        self.ep, self.ep_group = ep, ep_group
        self.pool_span, self.pool_index, self.pool_group = pool_span, pool_index, pool_group
        self.layer_id, self.use_loop, self.dedup_tokens = layer_id, use_loop, dedup_tokens
        self.bytes_log: dict[int, dict[str, int]] = {}
        self.clock = CollectiveTimer()  # time inside this dispatcher's collectives (fwd + bwd)
        self.elem_bytes = (
            4  # element size of the last tokens dispatched (for the theoretical minimum)
        )
        self.reset()

    def reset(self) -> None:
        self.bytes_log = {self.layer_id: dict.fromkeys(BYTE_KEYS, 0)}

    @property
    def comm_time_s(self) -> float:
        """Seconds inside this dispatcher's collectives since it was last set to 0."""
        return self.clock.seconds()

    @comm_time_s.setter
    def comm_time_s(self, value: float) -> None:
        self.clock.reset()
        self.clock.host_s = float(value)

    def _log(self, kind: str, sent: int, recv: int) -> None:
        rec = self.bytes_log[self.layer_id]
        rec[f"{kind}_sent"] += int(sent)
        rec[f"{kind}_recv"] += int(recv)

    def _token_counter(self, phase: str, sent: int, recv: int) -> None:
        self._log("tokens" if phase == "fwd" else "tokens_bwd", sent, recv)

    # --- Dispatcher protocol ----------------------------------------------------------------------
    def host_counts(self, counts: torch.Tensor) -> tuple[list[int], list[list[int]] | None]:
        """Exchange counts [E] over the ep group, then read both on the host in ONE transfer:
        (counts as a list, recv [ep][E_local]: rows each rank will send to this one)."""
        E, ep = counts.numel(), self.ep
        if ep == 1 or self.dedup_tokens:  # dedup exchanges its own metadata in _run_dedup
            return counts.tolist(), None
        El = E // ep
        send = counts.to(torch.long).view(ep, El)  # block j -> rank j
        tok = self.clock.start(counts.device)
        recv = exchange_counts(send, self.ep_group)  # [ep, El] from source i
        self.clock.stop(tok)
        row = El * send.element_size()
        self._log("counts", row * (ep - 1), row * (ep - 1))
        both = torch.cat([send.flatten(), recv.flatten()]).tolist()
        return both[:E], [both[E + j * El : E + (j + 1) * El] for j in range(ep)]

    @torch.no_grad()
    def gather_pool(self, t: torch.Tensor) -> torch.Tensor:
        """[N_local, E] -> [pool_span * N_local, E], global token order (ranks are consecutive)."""
        if self.pool_span == 1:
            return t
        tok = self.clock.start(t.device)
        out = all_gather_rows(t.detach(), self.pool_group)
        self.clock.stop(tok)
        own = t.numel() * t.element_size()
        self._log("scores", own * (self.pool_span - 1), out.numel() * out.element_size() - own)
        return out

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
        """tok_idx [M] (optional): the local token of each row; needed by dedup_tokens.

        counts_list: ``counts`` already on the host. static: every rank of the ep group sends
        exactly these counts (expert choice, pools on one rank): the splits are k x experts per rank
        both ways, no counts are exchanged and nothing is read from the device.
        """
        E, ep = counts.numel(), self.ep
        if E % ep or experts.num_experts != E // ep:
            raise ValueError(
                f"layer {layer_id}: {E} experts over ep={ep} ranks but this rank holds "
                f"{experts.num_experts} (expected {E // ep if E % ep == 0 else 'E divisible by ep'})"
            )
        if ep == 1:
            if self.use_loop:
                return experts.loop_forward(x, counts)
            return experts(x, counts, counts_list)
        if self.dedup_tokens:
            if tok_idx is None:
                raise ValueError(
                    f"layer {layer_id}: parallel.dedup_tokens needs the token index of each row "
                    "(run_experts(..., tok_idx=...)) and the MoE layer did not pass it"
                )
            return self._run_dedup(x, counts, experts, tok_idx)
        El = E // ep
        if static and counts_list is not None and len(set(counts_list)) == 1 and not self.use_loop:
            return self._run_static(x, counts_list[0], experts)
        if counts_list is None or recv_list is None:
            counts_list, recv_list = self.host_counts(counts)
        in_splits = [sum(counts_list[j * El : (j + 1) * El]) for j in range(ep)]
        out_splits = [sum(r) for r in recv_list]
        recv_counts = torch.tensor(recv_list, dtype=torch.long, device=x.device)  # [ep, El]
        self.elem_bytes = x.element_size()
        xr = self._timed_a2a(x, in_splits, out_splits, self.ep_group, self._token_counter)
        yr = self._experts_by_source(xr, recv_counts, experts, recv_list)
        return self._timed_a2a(yr, out_splits, in_splits, self.ep_group, self._token_counter)

    def _run_static(self, x: torch.Tensor, c: int, experts: StackedExperts) -> torch.Tensor:
        """Every (rank, expert) pair carries exactly c rows: splits El * c to and from every rank,
        and the (source, expert) -> (expert, source) permutation is a transpose."""
        ep, El, D = self.ep, experts.num_experts, x.shape[-1]
        splits = [El * c] * ep
        self.elem_bytes = x.element_size()
        xr = self._timed_a2a(x, splits, splits, self.ep_group, self._token_counter)
        xe = xr.view(ep, El, c, D).transpose(0, 1).reshape(El * ep * c, D)  # (expert, source)
        local = torch.full((El,), ep * c, dtype=torch.long, device=x.device)
        ye = experts(xe, local, [ep * c] * El)
        yr = ye.view(El, ep, c, D).transpose(0, 1).reshape(ep * El * c, D)  # (source, expert)
        return self._timed_a2a(yr, splits, splits, self.ep_group, self._token_counter)

    def _experts_by_source(
        self,
        xr: torch.Tensor,
        recv_counts: torch.Tensor,
        experts: StackedExperts,
        recv_list: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """Rows ordered (source rank, local expert) -> expert outputs in the same order.

        recv_list: ``recv_counts`` on the host (then nothing here reads the device)."""
        ep, El = recv_counts.shape
        local_expert = torch.arange(El, device=xr.device).repeat(ep)  # [ep*El]
        expert_of_row = torch.repeat_interleave(
            local_expert, recv_counts.flatten(), output_size=xr.shape[0]
        )
        order = torch.argsort(expert_of_row, stable=True)  # -> (local expert, source rank)
        xe = xr.index_select(0, order)
        local_counts = recv_counts.sum(0)
        local_list = [sum(r[e] for r in recv_list) for e in range(El)] if recv_list else None
        if self.use_loop:
            ye = experts.loop_forward(xe, local_counts)
        else:
            ye = experts(xe, local_counts, local_list)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return ye.index_select(0, inverse)

    def _run_dedup(
        self, x: torch.Tensor, counts: torch.Tensor, experts: StackedExperts, tok_idx: torch.Tensor
    ) -> torch.Tensor:
        """Send each token once per destination rank (not once per expert), plus an int32 slot per
        (token, expert) pair; the return trip stays per pair (the combine weight is applied on the
        token's own rank). Saves dispatch bytes, forward and backward, when a token is chosen by
        several experts of one rank.
        """
        E, ep = counts.numel(), self.ep
        El, M, dev = E // ep, x.shape[0], x.device
        counts = counts.to(torch.long)
        dest = torch.repeat_interleave(torch.arange(E, device=dev), counts) // El  # [M]
        n_tok = int(tok_idx.max()) + 1 if M else 1
        uniq, inv = torch.unique(
            dest * n_tok + tok_idx.long(), return_inverse=True
        )  # by (dest, tok)
        U = uniq.numel()
        first = torch.full((U,), M, dtype=torch.long, device=dev).scatter_reduce(
            0, inv, torch.arange(M, device=dev), "amin"
        )  # a row holding each unique (dest, token); its gradient sums the token's pairs
        uniq_per_dest = torch.bincount(uniq // n_tok, minlength=ep)  # [ep]
        slot = inv - (torch.cumsum(uniq_per_dest, 0) - uniq_per_dest)[dest]  # [M] within chunk
        send_meta = torch.cat([counts.view(ep, El), uniq_per_dest[:, None]], 1)  # [ep, El+1]
        tok = self.clock.start(x.device)
        recv_meta = exchange_counts(send_meta, self.ep_group)
        self.clock.stop(tok)
        row = (El + 1) * send_meta.element_size()
        self._log("counts", row * (ep - 1), row * (ep - 1))
        recv_counts, recv_uniq = recv_meta[:, :El], recv_meta[:, El]
        self.elem_bytes = x.element_size()
        xu = self._timed_a2a(
            x.index_select(0, first),
            uniq_per_dest.tolist(),
            recv_uniq.tolist(),
            self.ep_group,
            self._token_counter,
        )  # [U_recv, D] ordered by source rank
        pair_in = counts.view(ep, El).sum(1).tolist()
        pair_out = recv_counts.sum(1).tolist()
        slot_r = self._timed_a2a(
            slot.to(torch.int32), pair_in, pair_out, self.ep_group, self._index_counter
        )  # [P_recv] ordered (source rank, local expert, token)
        src = torch.repeat_interleave(
            torch.arange(ep, device=dev), torch.tensor(pair_out, device=dev)
        )
        src_start = torch.cumsum(recv_uniq, 0) - recv_uniq
        xr = xu.index_select(0, src_start[src] + slot_r.long())  # [P_recv, D]
        yr = self._experts_by_source(xr, recv_counts, experts)
        return self._timed_a2a(yr, pair_out, pair_in, self.ep_group, self._token_counter)

    def _index_counter(self, phase: str, sent: int, recv: int) -> None:
        self._log("index", sent, recv)

    def _timed_a2a(
        self,
        x: torch.Tensor,
        in_splits: list[int],
        out_splits: list[int],
        group: ProcessGroup,
        counter: ByteCounter,
    ) -> torch.Tensor:
        """all_to_all_single, its wall time added to comm_time_s in forward and in backward."""
        if x.requires_grad:
            x = _GradClock.apply(x, self, "end")  # its backward runs right after the a2a backward
        tok = self.clock.start(x.device)
        out = all_to_all_single(x, in_splits, out_splits, group, counter)
        self.clock.stop(tok)
        return _GradClock.apply(out, self, "start") if out.requires_grad else out


class _GradClock(torch.autograd.Function):
    """Identity; its backward stamps the time, so a pair of them brackets a collective's backward."""

    @staticmethod
    def forward(ctx, x, owner, edge):  # type: ignore[override]
        ctx.owner, ctx.edge = owner, edge
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.edge == "start":
            ctx.owner._bwd_tok = ctx.owner.clock.start(grad.device)
        elif getattr(ctx.owner, "_bwd_tok", None) is not None:
            ctx.owner.clock.stop(ctx.owner._bwd_tok)
            ctx.owner._bwd_tok = None
        return grad, None, None


# ----------------------------------------------------------------------------------------------------
def a2a_bytes_summary(model: nn.Module, reset: bool = True) -> dict:
    """Bytes this rank moved in the MoE layers since the last reset, for metrics.jsonl (`a2a_bytes`).

    Returns {"layers": {layer_id: {key: bytes}}, "total": {key: bytes}, "sent_bytes": int,
    "recv_bytes": int, "theoretical_min": int}. The minimum is 4 * N * C * D * bytes * (ep - 1) / ep summed over layers
    (N*C = this rank's (token, expert) pairs, i.e. stats.pairs of the last forward; 4 = dispatch and
    return, forward and backward; (ep - 1)/ep = share of experts on other ranks under uniform
    routing). Returns {} when no layer has an all-to-all dispatcher (ep = 1).
    """
    from diffmoe_dist.models.moe import MoELayer

    layers: dict[int, dict[str, int]] = {}
    total = dict.fromkeys(BYTE_KEYS, 0)
    minimum = 0.0
    for m in model.modules():
        if not isinstance(m, MoELayer) or not isinstance(m.dispatcher, AllToAllDispatcher):
            continue
        d = m.dispatcher
        for lid, rec in d.bytes_log.items():
            layers[lid] = dict(rec)
            for k, v in rec.items():
                total[k] += v
        minimum += 4 * m.stats.pairs * m.dim * d.elem_bytes * (d.ep - 1) / d.ep
        if reset:
            d.reset()
    if not layers:
        return {}  # no all-to-all dispatcher (ep = 1): nothing moved, nothing to log
    return {
        "layers": layers,
        "total": total,
        # bytes this rank put on the wire (compare with theoretical_min, which counts one direction)
        "sent_bytes": sum(v for k, v in total.items() if k.endswith("_sent")),
        "recv_bytes": sum(v for k, v in total.items() if k.endswith("_recv")),
        "theoretical_min": int(minimum),
    }
