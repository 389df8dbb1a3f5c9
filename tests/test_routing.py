"""Routing math (models/routing.py) on hand-worked examples.

Every expected mask below is worked out by hand from the scores written next to it; ties are broken
by token index (lower wins) for expert choice and by expert index (lower wins) for token choice.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from diffmoe_dist.models.routing import capacity_k, kth_largest, token_choice, topk_mask


def _scores(columns: list[list[float]]) -> torch.Tensor:
    """One pool from per-expert columns: columns[e][s] -> tensor [1, S, E]."""
    return torch.tensor(columns, dtype=torch.float32).t().unsqueeze(0)


def _mask(columns: list[list[int]]) -> torch.Tensor:
    return torch.tensor(columns, dtype=torch.bool).t().unsqueeze(0)


def _slow_topk(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Reference: for each (pool, expert) sort tokens by (-score, index) and take the first k."""
    P, S, E = scores.shape
    out = torch.zeros(P, S, E, dtype=torch.bool)
    for p, e in itertools.product(range(P), range(E)):
        order = sorted(range(S), key=lambda s: (-float(scores[p, s, e]), s))
        for s in order[: max(0, min(int(k[p, e]), S))]:
            out[p, s, e] = True
    return out


def test_topk_mask_hand_example() -> None:
    # expert 0 scores tokens [0.1, 0.9, 0.5, 0.7] -> top-2 = tokens 1, 3
    # expert 1 scores tokens [0.8, 0.2, 0.6, 0.4] -> top-2 = tokens 0, 2
    scores = _scores([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.6, 0.4]])
    got = topk_mask(scores, 2)
    assert torch.equal(got, _mask([[0, 1, 0, 1], [1, 0, 1, 0]]))


def test_topk_mask_ties_lower_token_wins() -> None:
    # expert 0: all four tied -> k=2 takes tokens 0, 1.
    # expert 1: 0.9 is clearly first (token 3); tokens 0, 1, 2 tie at 0.5 -> k=2 adds token 0.
    # expert 2: tokens 0, 1, 3 tie at 0.7: three-way tie for two places -> tokens 0, 1.
    scores = _scores([[0.3, 0.3, 0.3, 0.3], [0.5, 0.5, 0.5, 0.9], [0.7, 0.7, 0.1, 0.7]])
    got = topk_mask(scores, 2)
    assert torch.equal(got, _mask([[1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 0, 0]]))
    # Exactly k per expert even with ties.
    assert got.sum(1).tolist() == [[2, 2, 2]]


def test_topk_mask_k_zero_and_k_at_least_s() -> None:
    scores = _scores([[0.1, 0.9, 0.5], [0.3, 0.2, 0.6]])
    assert not topk_mask(scores, 0).any()
    assert topk_mask(scores, 3).all()
    assert topk_mask(scores, 7).all()  # k > S clamps to S
    assert not topk_mask(scores, -1).any()


def test_topk_mask_pools_are_independent() -> None:
    # Two pools, one expert: pool 0 top-1 = token 2, pool 1 top-1 = token 0.
    scores = torch.tensor([[[0.1], [0.2], [0.3]], [[0.9], [0.2], [0.3]]])
    got = topk_mask(scores, 1)
    assert got[..., 0].tolist() == [[False, False, True], [True, False, False]]


def test_topk_mask_tensor_k_per_pool_and_expert() -> None:
    # pool 0: expert 0 scores [0.4, 0.4, 0.1, 0.9], expert 1 scores [0.2, 0.8, 0.8, 0.8]
    # pool 1: expert 0 scores [0.5, 0.6, 0.7, 0.8], expert 1 scores [0.0, 0.0, 0.0, 0.0]
    scores = torch.tensor(
        [
            [[0.4, 0.2], [0.4, 0.8], [0.1, 0.8], [0.9, 0.8]],
            [[0.5, 0.0], [0.6, 0.0], [0.7, 0.0], [0.8, 0.0]],
        ]
    )
    k = torch.tensor([[2, 0], [3, 1]])
    got = topk_mask(scores, k)
    expected = torch.tensor(
        [
            # pool 0, e0 k=2: token 3 (0.9), then tie 0.4 between tokens 0, 1 -> token 0.
            # pool 0, e1 k=0: nothing.
            [[1, 0], [0, 0], [0, 0], [1, 0]],
            # pool 1, e0 k=3: tokens 3, 2, 1.  e1 k=1: four-way tie -> token 0.
            [[0, 1], [1, 0], [1, 0], [1, 0]],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(got, expected)
    # All zeros and k >= S in tensor form.
    assert not topk_mask(scores, torch.zeros(2, 2, dtype=torch.long)).any()
    assert topk_mask(scores, torch.full((2, 2), 9, dtype=torch.long)).all()


def test_topk_mask_matches_slow_reference_with_many_ties() -> None:
    g = torch.Generator().manual_seed(0)
    # Scores drawn from 3 values -> many ties.
    scores = torch.randint(0, 3, (3, 11, 4), generator=g).float() / 3
    for k in range(0, 13):
        kt = torch.full((3, 4), k, dtype=torch.long)
        assert torch.equal(topk_mask(scores, k), _slow_topk(scores, kt)), k
    kt = torch.randint(0, 12, (3, 4), generator=g)
    assert torch.equal(topk_mask(scores, kt), _slow_topk(scores, kt))


def test_kth_largest() -> None:
    # expert 0 values [0.2, 0.9, 0.5, 0.7]: sorted 0.9, 0.7, 0.5, 0.2
    # expert 1 values [0.6, 0.6, 0.1, 0.3]: sorted 0.6, 0.6, 0.3, 0.1 (ties count separately)
    v = _scores([[0.2, 0.9, 0.5, 0.7], [0.6, 0.6, 0.1, 0.3]])
    assert torch.allclose(kth_largest(v, 1), torch.tensor([[0.9, 0.6]]))
    assert torch.allclose(kth_largest(v, 2), torch.tensor([[0.7, 0.6]]))
    assert torch.allclose(kth_largest(v, 3), torch.tensor([[0.5, 0.3]]))
    # clamped to [1, S]
    assert torch.allclose(kth_largest(v, 0), torch.tensor([[0.9, 0.6]]))
    assert torch.allclose(kth_largest(v, 10), torch.tensor([[0.2, 0.1]]))


@pytest.mark.parametrize(
    "S, C, E, expected",
    [
        (256, 1.0, 16, 16),  # one image of 256 tokens, C = 1
        (64 * 256, 1.0, 16, 1024),  # the paper's 64-image pool
        (10, 1.0, 4, 2),  # floor(2.5)
        (10, 0.5, 4, 1),  # floor(1.25)
        (7, 2.0, 3, 4),  # floor(14 / 3)
        (3, 1.0, 8, 0),  # fewer tokens than experts
        (100, 1.25, 8, 15),  # floor(15.625)
    ],
)
def test_capacity_k_is_floor(S: int, C: float, E: int, expected: int) -> None:
    assert capacity_k(S, C, E) == expected


def test_token_choice_top1_ties_lower_expert() -> None:
    scores = torch.tensor(
        [
            [0.1, 0.7, 0.2],  # -> expert 1
            [0.4, 0.2, 0.4],  # tie 0 / 2 -> expert 0
            [0.2, 0.4, 0.4],  # tie 1 / 2 -> expert 1
            [1 / 3, 1 / 3, 1 / 3],  # all tied -> expert 0
        ]
    )
    got = token_choice(scores)
    expected = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert torch.equal(got, expected)
    assert got.dtype == torch.bool
