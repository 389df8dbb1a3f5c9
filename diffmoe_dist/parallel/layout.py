"""Rank arithmetic of the expert-parallel layout: pure integers, no torch.distributed.

World = dp x ep. Expert-parallel (ep) groups are consecutive ranks [g*ep, (g+1)*ep): rank r holds
samples [r*micro, (r+1)*micro) of the global batch, so a pool spanning m consecutive ranks of an ep
group is m consecutive slices of the global batch (the global sample order is kept). Ranks with the
same ep_rank (r % ep) hold the same expert slice and form an expert-data-parallel (edp) group. A pool
group is pool_span consecutive ranks inside an ep group.

    world 4, ep 2, pool_span 2:  ep groups {0,1} {2,3}; edp groups {0,2} {1,3}; pool groups {0,1} {2,3}
"""

from __future__ import annotations

from dataclasses import dataclass

from diffmoe_dist.config import Config, validate_layout


@dataclass(frozen=True)
class Layout:
    world_size: int
    ep: int
    pool_span: int = 1
    num_experts: int = 0  # experts per MoE layer (0: dense model, nothing to shard)

    def __post_init__(self) -> None:
        W, ep, span, E = self.world_size, self.ep, self.pool_span, self.num_experts
        if W < 1 or ep < 1 or span < 1:
            raise ValueError(f"world_size={W}, ep={ep}, pool_span={span}; all must be >= 1")
        if W % ep:
            raise ValueError(f"parallel.ep={ep} does not divide the world size {W}")
        if ep % span:
            raise ValueError(
                f"a pool spanning {span} ranks must fit inside an expert-parallel group: "
                f"pool_span={span} does not divide parallel.ep={ep}"
            )
        if E and E % ep:
            raise ValueError(f"parallel.ep={ep} does not divide moe.num_experts={E}")
        if ep > 1 and not E:
            raise ValueError(f"parallel.ep={ep} with a dense model (no experts to shard)")

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep

    # --- coordinates of one rank -----------------------------------------------------------------
    def ep_rank(self, rank: int) -> int:
        return rank % self.ep

    def edp_rank(self, rank: int) -> int:
        return rank // self.ep

    def pool_index(self, rank: int) -> int:
        return rank % self.pool_span

    def expert_slice(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the global expert indices this rank keeps."""
        n = self.experts_per_rank
        return self.ep_rank(rank) * n, (self.ep_rank(rank) + 1) * n

    # --- every group, in the order every rank must create them -------------------------------------
    def ep_groups(self) -> list[list[int]]:
        return [list(range(g * self.ep, (g + 1) * self.ep)) for g in range(self.dp)]

    def edp_groups(self) -> list[list[int]]:
        return [list(range(i, self.world_size, self.ep)) for i in range(self.ep)]

    def pool_groups(self) -> list[list[int]]:
        s = self.pool_span
        return [list(range(g * s, (g + 1) * s)) for g in range(self.world_size // s)]

    def group_of(self, groups: list[list[int]], rank: int) -> int:
        return next(i for i, g in enumerate(groups) if rank in g)


def layout_from_config(cfg: Config, world_size: int) -> Layout:
    """validate_layout (global batch, ep, pool) plus the expert checks -> a Layout; ValueError otherwise."""
    if cfg.parallel.ep > 1 and cfg.moe.mode == "dense":
        raise ValueError(
            f"parallel.ep={cfg.parallel.ep} with moe.mode='dense': a dense FFN has no experts to shard"
        )
    info = validate_layout(cfg, world_size)
    E = cfg.moe.num_experts if cfg.moe.mode != "dense" else 0
    return Layout(world_size, info["ep"], info["pool_span"], E)
