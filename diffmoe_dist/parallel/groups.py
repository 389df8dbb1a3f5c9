"""The expert-parallel and expert-data-parallel groups, built from one of three sources.

``parallel.groups`` picks who creates the process groups; the layout is the same for all three
(DESIGN.md section 2, parallel/layout.py): ep groups are consecutive ranks ``[g*ep, (g+1)*ep)`` and
edp groups are the ranks with the same ``rank % ep``.

    torch      torch.distributed.new_group over the layout's rank lists (parallel/layout.py); the
               path training takes by default
    deepspeed  deepspeed.utils.groups._create_expert_and_data_parallel(ep), the groups DeepSpeed-MoE
               reduces expert gradients over (registered under the name ``ep_size_<ep>``)
    megatron   megatron.core.parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
               with tensor = pipeline = context parallel 1

Every source is checked against the layout after creation, so a source whose rank order ever changes
fails at start-up with both memberships instead of training a silently different model.

Group creation is collective: every rank calls ``build_expert_groups`` with the same arguments, in
the same order relative to its other group creations.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import ProcessGroup

from diffmoe_dist.parallel.layout import edp_groups, ep_groups

log = logging.getLogger(__name__)

GROUP_SOURCES = ("torch", "deepspeed", "megatron")


@dataclass(frozen=True)
class ExpertGroups:
    """This rank's two expert groups, as rank lists (global ranks, ascending) and ProcessGroups."""

    source: str
    ep_ranks: list[int]  # ranks that split the experts between them (size ep)
    edp_ranks: list[int]  # ranks holding the same expert slice (size world / ep)
    ep_group: ProcessGroup | None  # None when world_size == 1
    edp_group: ProcessGroup | None


def build_expert_groups(
    source: str, world_size: int, rank: int, ep: int, timeout: timedelta | None = None
) -> ExpertGroups:
    """Create the ep and edp groups with ``source`` (torch | deepspeed | megatron); return this rank's.

    Raises ValueError for an unknown source, an ep that does not divide the world, a source that is
    not installed (naming the package and the config key), or a source whose membership differs from
    the layout (naming both).
    """
    if source not in GROUP_SOURCES:
        raise ValueError(f"parallel.groups={source!r}; expected one of {', '.join(GROUP_SOURCES)}")
    all_ep, all_edp = ep_groups(world_size, ep), edp_groups(world_size, ep)  # checks the degrees
    want_ep, want_edp = all_ep[rank // ep], all_edp[rank % ep]
    if world_size == 1:
        return ExpertGroups(source, want_ep, want_edp, None, None)
    if not dist.is_initialized():
        raise ValueError(f"world_size={world_size} but torch.distributed is not initialised")
    build = {"torch": _torch_groups, "deepspeed": _deepspeed_groups, "megatron": _megatron_groups}
    ep_group, edp_group = build[source](world_size, ep, timeout)
    got_ep = sorted(dist.get_process_group_ranks(ep_group))
    got_edp = sorted(dist.get_process_group_ranks(edp_group))
    if (got_ep, got_edp) != (want_ep, want_edp):
        raise ValueError(
            f"parallel.groups={source!r} built ep group {got_ep} / edp group {got_edp} for rank {rank}, "
            f"but the layout (world {world_size}, ep {ep}) needs {want_ep} / {want_edp}"
        )
    return ExpertGroups(source, got_ep, got_edp, ep_group, edp_group)


# ----------------------------------------------------------------------------------------------------
# the three sources; each returns (ep_group, edp_group) of the calling rank


def _torch_groups(
    world_size: int, ep: int, timeout: timedelta | None
) -> tuple[ProcessGroup, ProcessGroup]:
    # The production path: one dist.new_group per group of the layout, every rank in the same order.
    rank = dist.get_rank()
    mine = []
    for groups in (ep_groups(world_size, ep), edp_groups(world_size, ep)):
        for ranks in groups:
            g = dist.new_group(ranks=ranks, timeout=timeout)
            if rank in ranks:
                mine.append(g)
    return mine[0], mine[1]


def disable_deepspeed_shm_comm() -> None:
    """Stop deepspeed.comm from JIT-building its shared-memory CPU op (~30 s per fresh machine).

    That op only serves ``inference_all_reduce``; training collectives go through torch.distributed.
    DeepSpeed keeps its op-compatibility table in one module-level dict, so marking the op
    incompatible before ``deepspeed.comm.init_distributed`` skips the build. Set
    ``DIFFMOE_DS_SHM_COMM=1`` to keep DeepSpeed's default (build and use it).
    """
    if os.environ.get("DIFFMOE_DS_SHM_COMM", "0") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_deepspeed_comm() -> None:
    """deepspeed.comm on top of the already initialised torch.distributed default group."""
    disable_deepspeed_shm_comm()
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


def _deepspeed_groups(
    world_size: int, ep: int, timeout: timedelta | None
) -> tuple[ProcessGroup, ProcessGroup]:
    try:
        from deepspeed.utils import groups as ds_groups
    except ImportError as e:
        raise ValueError(
            f"parallel.groups='deepspeed' needs deepspeed, which cannot be imported ({e}); "
            "install it with `DS_BUILD_OPS=0 pip install -c constraints.txt deepspeed==0.19.8` "
            "or set parallel.groups=torch"
        ) from e
    init_deepspeed_comm()
    name = f"ep_size_{ep}"
    # Creates the groups once per name (idempotent); E + D order: ep groups are consecutive ranks.
    ds_groups._create_expert_and_data_parallel(ep)
    return ds_groups._get_expert_parallel_group(name), ds_groups._get_expert_data_parallel_group(
        name
    )


def _megatron_groups(
    world_size: int, ep: int, timeout: timedelta | None
) -> tuple[ProcessGroup, ProcessGroup]:
    try:
        from megatron.core import parallel_state
    except ImportError as e:
        raise ValueError(
            f"parallel.groups='megatron' needs megatron-core, which cannot be imported ({e}); "
            "install it with `pip install -c constraints.txt megatron-core==0.16.1` "
            "or set parallel.groups=torch"
        ) from e
    if parallel_state.model_parallel_is_initialized():
        have = parallel_state.get_expert_model_parallel_world_size()
        if have != ep:
            raise ValueError(
                f"megatron parallel_state is already initialised with expert_model_parallel_size={have}, "
                f"but parallel.ep={ep}; call parallel_state.destroy_model_parallel() first"
            )
    else:
        minutes = 30 if timeout is None else max(1, int(timeout.total_seconds() // 60))
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1,
            expert_model_parallel_size=ep,
            distributed_timeout_minutes=minutes,
            create_gloo_process_groups=False,  # the default backend already is gloo on CPU
        )
    return (
        parallel_state.get_expert_model_parallel_group(),
        parallel_state.get_expert_data_parallel_group(),
    )
