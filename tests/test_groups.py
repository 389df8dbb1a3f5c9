"""parallel.groups: torch new_group over the layout (the training path), DeepSpeed expert groups
and Megatron-core parallel_state agree.

One spawn per world size (2 and 4 gloo CPU ranks); inside it every ep dividing the world is built from
all three sources, and each rank's ep / edp memberships are compared, rank for rank, with each other
and with the layout (parallel/layout.py). A collective over each returned group checks the
ProcessGroup objects are live and hold the ranks they claim (exact integer sums, no tolerance).
"""

from __future__ import annotations

import builtins
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import run_distributed  # noqa: E402

from diffmoe_dist.parallel.groups import build_expert_groups  # noqa: E402
from diffmoe_dist.parallel.layout import Layout  # noqa: E402


def _members(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    out = {}
    for ep in (1, 2, 4):
        if world_size % ep:
            continue
        for source in ("torch", "deepspeed", "megatron"):
            g = build_expert_groups(source, world_size, rank, ep)
            # the ProcessGroups are real: SUM of the ranks over each equals the sum of its members
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=g.ep_group)
            u = torch.tensor([float(rank)])
            dist.all_reduce(u, group=g.edp_group)
            out[(ep, source)] = (g.ep_ranks, g.edp_ranks, t.item(), u.item())
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 4])
def test_three_sources_agree(world_size: int) -> None:
    results = run_distributed(_members, world_size, timeout_s=200, pg_timeout_s=60)
    for rank, res in enumerate(results):
        for ep in (1, 2, 4):
            if world_size % ep:
                continue
            lay = Layout(world_size, ep, 1, 4)
            want_ep = lay.ep_groups()[lay.group_of(lay.ep_groups(), rank)]
            want_edp = lay.edp_groups()[lay.group_of(lay.edp_groups(), rank)]
            for source in ("torch", "deepspeed", "megatron"):
                ep_r, edp_r, s_ep, s_edp = res[(ep, source)]
                assert (ep_r, edp_r) == (want_ep, want_edp), (world_size, ep, source, rank)
                assert s_ep == sum(want_ep) and s_edp == sum(want_edp), (source, ep, rank)


def test_single_process_needs_no_groups() -> None:
    g = build_expert_groups("torch", 1, 0, 1)
    assert g.ep_group is None and g.edp_ranks == [0]


def test_bad_source_and_ep() -> None:
    with pytest.raises(ValueError, match="parallel.groups='nccl'"):
        build_expert_groups("nccl", 1, 0, 1)
    with pytest.raises(ValueError, match="parallel.ep=3 does not divide the world size 4"):
        build_expert_groups("torch", 4, 0, 3)


def test_megatron_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """groups: megatron without megatron-core importable -> ValueError naming the key and package."""
    real_import = builtins.__import__

    def no_megatron(name: str, *args, **kwargs):
        if name.startswith("megatron"):
            raise ImportError("No module named 'megatron'")
        return real_import(name, *args, **kwargs)

    from diffmoe_dist.parallel import groups

    monkeypatch.setattr(builtins, "__import__", no_megatron)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match=r"parallel.groups='megatron' needs megatron-core"):
        groups.build_expert_groups("megatron", 2, 0, 2)
