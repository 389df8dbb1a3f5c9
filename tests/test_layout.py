"""Rank arithmetic of the expert-parallel layout and the start-up refusals (no processes spawned)."""

from __future__ import annotations

import pytest

from diffmoe_dist.config import from_dict
from diffmoe_dist.parallel.layout import Layout, layout_from_config
from diffmoe_dist.parallel.parallelize import build_parallel_state


def _cfg(ep: int = 1, E: int = 4, G: int = 8, P: int = 2, mode: str = "diffmoe"):
    return from_dict(
        {
            "moe": {"mode": mode, "num_experts": E, "pool_samples": P},
            "train": {"global_batch_size": G},
            "parallel": {"ep": ep},
        }
    )


def test_groups_world4_ep2_span2():
    lay = Layout(world_size=4, ep=2, pool_span=2, num_experts=4)
    assert lay.dp == 2 and lay.experts_per_rank == 2
    assert lay.ep_groups() == [[0, 1], [2, 3]]
    assert lay.edp_groups() == [[0, 2], [1, 3]]
    assert lay.pool_groups() == [[0, 1], [2, 3]]
    assert [lay.expert_slice(r) for r in range(4)] == [(0, 2), (2, 4), (0, 2), (2, 4)]
    assert [lay.pool_index(r) for r in range(4)] == [0, 1, 0, 1]


def test_groups_partition_the_world():
    for W, ep, span in [(8, 4, 2), (8, 2, 1), (6, 3, 3), (4, 1, 1)]:
        lay = Layout(W, ep, span, num_experts=12)
        for groups, size in [
            (lay.ep_groups(), ep),
            (lay.edp_groups(), W // ep),
            (lay.pool_groups(), span),
        ]:
            assert sorted(r for g in groups for r in g) == list(range(W))
            assert all(len(g) == size for g in groups)
        # a pool group lies inside one ep group and is consecutive (global sample order)
        for g in lay.pool_groups():
            assert g == list(range(g[0], g[0] + span)) and g[0] // ep == g[-1] // ep


def test_layout_from_config_pool_span():
    assert layout_from_config(_cfg(ep=2, G=8, P=4), 4).pool_span == 2  # micro 2, pool 4
    assert layout_from_config(_cfg(ep=2, G=8, P=2), 2).pool_span == 1  # micro 4, pools within


@pytest.mark.parametrize(
    "make,world,words",
    [
        (lambda: Layout(4, 3, 1, 6), 4, ["ep=3", "world size 4"]),
        (lambda: Layout(4, 2, 1, 3), 4, ["ep=2", "num_experts=3"]),
        (lambda: Layout(4, 2, 4, 4), 4, ["pool_span=4", "ep=2"]),
        (lambda: layout_from_config(_cfg(ep=2), 3), 3, ["global_batch_size=8", "world size 3"]),
        (lambda: layout_from_config(_cfg(ep=4, G=8), 2), 2, ["ep=4", "world size 2"]),
        # micro 2, pool 8 = 4 x micro but ep 2: the pool would leave the ep group
        (
            lambda: layout_from_config(_cfg(ep=2, G=8, P=8), 4),
            4,
            ["pool_samples=8", "micro-batch is 2", "ep=2"],
        ),
        (
            lambda: layout_from_config(_cfg(ep=2, G=8, P=3), 2),
            2,
            ["pool_samples=3", "global_batch_size=8"],
        ),
        (lambda: build_parallel_state(_cfg(ep=2), 2, 0), 2, ["world_size=2", "not initialised"]),
    ],
)
def test_bad_layouts_are_refused_with_numbers(make, world, words):
    with pytest.raises(ValueError) as info:
        make()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_startup_refuses_ep_with_dense_or_indivisible_experts():
    # layout_from_config is what build_parallel_state runs first, before any group exists.
    with pytest.raises(ValueError, match=r"ep=2.*dense"):
        layout_from_config(_cfg(ep=2, mode="dense"), 2)
    with pytest.raises(ValueError, match=r"ep=3.*num_experts=4"):
        layout_from_config(_cfg(ep=3, E=4, G=3, P=1), 3)


def test_one_home_for_the_refusals_and_the_numbers():
    """The layout holds every number (ParallelState copies none; config.validate_layout is a view
    of it); sampling builds its layout directly (no invented global batch)."""
    from diffmoe_dist.config import validate_layout
    from diffmoe_dist.parallel.layout import sampling_layout

    lay = layout_from_config(_cfg(ep=2, G=8, P=4), 4)
    assert validate_layout(_cfg(ep=2, G=8, P=4), 4) == {
        "world_size": 4,
        "ep": 2,
        "dp": 2,
        "micro_batch": 2,
        "pool_span": 2,
    }
    assert sampling_layout(_cfg(ep=1, G=8, P=4), 1) == Layout(1, 1, 1, 4)
    ps = build_parallel_state(_cfg(), 1, 0, sampling_layout(_cfg(), 1))
    assert ps.layout == Layout(1, 1, 1, 4) and (ps.ep, ps.dp, ps.ep_rank, ps.pool_span) == (
        1,
        1,
        0,
        1,
    )
    with pytest.raises(ValueError, match="layout is for world size 4, not 1"):
        build_parallel_state(_cfg(), 1, 0, lay)
