"""Pure routing math: which (token, expert) pairs an MoE layer processes, with deterministic ties.

Shapes: a pool is S tokens; scores are [P, S, E] for P pools; masks have the same shape, True where
expert e processes token s. Ties in a top-k are broken by token index (lower index wins), so a pool
split across ranks and gathered in global order selects exactly what one process would.
"""

from __future__ import annotations

import torch


def topk_mask(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Per (pool, expert), mark the k highest-scoring tokens along dim 1; ties -> lower index.

    scores: [P, S, E]; k: an int, or a long tensor [P, E] (a count per pool and expert, may be 0).
    Returns a bool mask [P, S, E] with exactly min(k, S) True entries per (pool, expert).
    """
    P, S, E = scores.shape
    # A diverged model (NaN activations) must still get exactly k per expert, so that the static
    # shapes downstream hold and the trainer's non-finite check sees the NaN loss instead of an
    # IndexError: NaN ranks below every number (NaN compares False with everything).
    scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if isinstance(k, int):
        k = max(0, min(k, S))
        if k == 0:
            return torch.zeros_like(scores, dtype=torch.bool)
        if k == S:
            return torch.ones_like(scores, dtype=torch.bool)
        kth = torch.topk(scores, k, dim=1).values[:, k - 1 : k, :]  # [P, 1, E]
        k_t = torch.full((P, 1, E), k, dtype=torch.long, device=scores.device)
    else:
        k_t = k.clamp(0, S).to(torch.long).view(P, 1, E)
        sorted_vals = torch.sort(scores, dim=1, descending=True).values  # [P, S, E]
        kth = sorted_vals.gather(1, (k_t - 1).clamp(min=0))  # [P, 1, E]
    above = scores > kth
    tied = scores == kth
    # Among the tokens tied with the k-th value take the lowest indices until k are chosen.
    need = k_t - above.sum(dim=1, keepdim=True)  # [P, 1, E]
    take_tied = tied & (torch.cumsum(tied.to(torch.int32), dim=1) <= need)
    return (above | take_tied) & (k_t > 0)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """values [P, S, E] -> the k-th largest along S per (pool, expert): [P, E] (k clamped to [1, S])."""
    S = values.shape[1]
    k = max(1, min(k, S))
    return torch.topk(values, k, dim=1).values[:, k - 1, :]


def capacity_k(pool_tokens: int, capacity: float, num_experts: int) -> int:
    """k = floor(S * C / E): tokens each expert takes from a pool of S tokens."""
    return int(pool_tokens * capacity // num_experts)


def token_choice(scores: torch.Tensor) -> torch.Tensor:
    """Top-1 token choice: [N, E] -> bool mask [N, E], one expert per token (ties -> lower expert)."""
    choice = torch.argmax(scores, dim=-1)  # first maximal index on ties
    # scatter, not one_hot: one_hot reads the indices back to check their range (a host sync)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, choice[:, None], True)
