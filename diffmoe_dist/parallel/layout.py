"""The expert-parallel layout, in one place: validation of the degrees, the pool span and the batch,
and the rank lists of every group. Pure integers, no torch.distributed.

World = dp x ep. Expert-parallel (ep) groups are consecutive ranks [g*ep, (g+1)*ep): rank r holds
samples [r*micro, (r+1)*micro) of the global batch, so a pool spanning m consecutive ranks of an ep
group is m consecutive slices of the global batch (the global sample order is kept). Ranks with the
same ep_rank (r % ep) hold the same expert slice and form an expert-data-parallel (edp) group. A pool
group is pool_span consecutive ranks inside an ep group.

    world 4, ep 2, pool_span 2:  ep groups {0,1} {2,3}; edp groups {0,2} {1,3}; pool groups {0,1} {2,3}

Entry points: ``layout_from_config(cfg, world_size)`` for training (called once per start, before
any process group exists), ``sampling_layout(cfg, world_size)`` for sampling / evaluation (no global
batch: pools inside a rank). Both raise ValueError naming the config keys and the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffmoe_dist.models.moe import POOLED_MODES

if TYPE_CHECKING:
    from diffmoe_dist.config import Config


def check_degrees(world_size: int, ep: int) -> None:
    """ValueError unless ``ep`` splits ``world_size`` ranks into whole expert-parallel groups."""
    if world_size < 1 or ep < 1:
        raise ValueError(f"world_size={world_size}, parallel.ep={ep}; both must be >= 1")
    if world_size % ep:
        raise ValueError(f"parallel.ep={ep} does not divide the world size {world_size}")


def check_experts(ep: int, num_experts: int) -> None:
    """ValueError unless ``ep`` splits ``num_experts`` experts per layer (0: a dense model) evenly.
    Also run when a config is loaded (config.validate), the earliest point it can be refused."""
    if ep > 1 and not num_experts:
        raise ValueError(
            f"parallel.ep={ep} with moe.mode='dense': a dense FFN has no experts to shard"
        )
    if num_experts and num_experts % ep:
        raise ValueError(f"parallel.ep={ep} does not divide moe.num_experts={num_experts}")


def ep_groups(world_size: int, ep: int) -> list[list[int]]:
    """Expert-parallel groups: consecutive ranks [g*ep, (g+1)*ep)."""
    check_degrees(world_size, ep)
    return [list(range(g * ep, (g + 1) * ep)) for g in range(world_size // ep)]


def edp_groups(world_size: int, ep: int) -> list[list[int]]:
    """Expert-data-parallel groups: the ranks with the same ``rank % ep`` (same expert slice)."""
    check_degrees(world_size, ep)
    return [list(range(i, world_size, ep)) for i in range(ep)]


@dataclass(frozen=True)
class Layout:
    world_size: int
    ep: int
    pool_span: int = 1
    num_experts: int = 0  # experts per MoE layer (0: dense model, nothing to shard)
    micro_batch: int = 0  # samples per rank per step (0: not a training layout)

    def __post_init__(self) -> None:
        W, ep, span, E = self.world_size, self.ep, self.pool_span, self.num_experts
        if span < 1:
            raise ValueError(f"pool_span={span}; must be >= 1")
        check_degrees(W, ep)
        if ep % span:
            raise ValueError(
                f"a pool spanning {span} ranks must fit inside an expert-parallel group: "
                f"pool_span={span} does not divide parallel.ep={ep}"
            )
        check_experts(ep, E)

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
        return ep_groups(self.world_size, self.ep)

    def edp_groups(self) -> list[list[int]]:
        return edp_groups(self.world_size, self.ep)

    def pool_groups(self) -> list[list[int]]:
        s = self.pool_span
        return [list(range(g * s, (g + 1) * s)) for g in range(self.world_size // s)]

    def group_of(self, groups: list[list[int]], rank: int) -> int:
        return next(i for i, g in enumerate(groups) if rank in g)

    def ep_ranks(self, rank: int) -> list[int]:
        """The ep group ``rank`` belongs to (global ranks, ascending)."""
        return self.ep_groups()[self.edp_rank(rank)]

    def edp_ranks(self, rank: int) -> list[int]:
        """The expert-data-parallel group ``rank`` belongs to (global ranks, ascending)."""
        return self.edp_groups()[self.ep_rank(rank)]


def _experts(cfg: Config) -> int:
    return cfg.moe.num_experts if cfg.moe.mode != "dense" else 0


def layout_from_config(cfg: Config, world_size: int) -> Layout:
    """The training layout of ``cfg`` on ``world_size`` ranks, checked once per start before any
    process group exists; ValueError with every number when the global batch, gradient
    accumulation, ep, experts or pool cannot be laid out."""
    G, ep, P = cfg.train.global_batch_size, cfg.parallel.ep, cfg.moe.pool_samples
    A = cfg.train.grad_accum_steps
    if G % world_size:
        raise ValueError(
            f"train.global_batch_size={G} is not divisible by the world size {world_size}"
        )
    if world_size % ep:
        raise ValueError(f"parallel.ep={ep} does not divide the world size {world_size}")
    if G % (world_size * A):
        raise ValueError(
            f"train.grad_accum_steps={A} does not divide the per-rank batch {G // world_size} "
            f"(train.global_batch_size={G} / world {world_size}) into equal micro-batches"
        )
    micro = G // (world_size * A)  # samples per rank per forward
    span = 1
    if cfg.moe.mode in POOLED_MODES:
        if (G // A) % P:
            raise ValueError(
                f"moe.pool_samples={P} does not divide train.global_batch_size={G} / "
                f"train.grad_accum_steps={A} = {G // A}: "
                "the global batch is cut into pools of pool_samples consecutive samples"
            )
        if micro % P == 0:
            span = 1
        elif P % micro == 0 and ep % (P // micro) == 0:
            span = P // micro
        else:
            raise ValueError(
                f"this layout cannot realise moe.pool_samples={P}: micro-batch is {micro} "
                f"(global batch {G} / world {world_size} / train.grad_accum_steps {A}); pool_samples "
                "must divide the micro-batch, or be "
                f"m x micro-batch with m dividing parallel.ep={ep}"
            )
    return Layout(world_size, ep, span, _experts(cfg), micro)


def sampling_layout(cfg: Config, world_size: int) -> Layout:
    """Sampling / evaluation: ``world_size`` ranks, ``parallel.ep``, pools inside a rank (there is no
    global training batch; a rank's batch is cut into pools, models/moe.py)."""
    return Layout(world_size, cfg.parallel.ep, 1, _experts(cfg))
