"""Deterministic global-batch sampling whose math does not depend on the number of ranks.

Conventions
-----------
* The data order is an infinite stream of per-epoch permutations of ``range(num_samples)``:
  epoch ``e`` is ``randperm(num_samples)`` drawn from a generator seeded by ``(seed, e)``.
  Step ``s`` of a run with global batch ``G`` consumes stream positions ``s*G .. s*G+G-1``, so a
  batch may straddle an epoch boundary and every sample is seen exactly once per epoch.
* The global batch keeps this fixed order; data-parallel rank ``dp_rank`` of ``dp_degree`` holds
  the contiguous slice ``[dp_rank*G/dp_degree, (dp_rank+1)*G/dp_degree)``. Concatenating the
  slices in rank order gives the global batch back, which is what makes MoE pools (consecutive
  samples of the global batch) the same on 1 rank or on 64.
* Per-sample randomness (noise, t, label dropout, flip) is keyed by ``(seed, step, sample_id,
  stream)`` where ``sample_id`` is the position in the global batch (0..G-1), never the rank or
  the position in the micro-batch. Keys go through ``numpy.random.SeedSequence`` (a documented,
  stable hash across platforms and numpy versions) to a 64-bit seed for a CPU ``torch.Generator``.
  A sample's draws are therefore identical whichever rank computes them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

# Stream ids that separate independent per-sample draws of one step. The trainer picks one per
# quantity so that, e.g., t and the label-dropout coin are not the same uniform number.
NOISE_STREAM = 0
TIME_STREAM = 1
LABEL_DROP_STREAM = 2
FLIP_STREAM = 3

# Domain tags keep the epoch-permutation seeds disjoint from the per-sample seeds even when the
# integers happen to collide ((seed, e) vs (seed, step, id, stream) have different lengths too,
# but an explicit tag documents intent and survives future changes to the key layout).
_PERM_DOMAIN = 0x5045524D  # "PERM"
_SAMPLE_DOMAIN = 0x53414D50  # "SAMP"


def _check_nonneg(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _seed_from_key(*key: int) -> int:
    """64-bit seed for torch.Generator from a tuple of non-negative ints (SeedSequence hash)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    # Cached: consecutive steps reuse the same epoch's permutation (tensor is never mutated;
    # callers receive index_select copies).
    g = torch.Generator(device="cpu")
    g.manual_seed(_seed_from_key(_PERM_DOMAIN, seed, epoch))
    return torch.randperm(num_samples, generator=g, dtype=torch.long)


def global_batch_indices(
    num_samples: int, global_batch_size: int, seed: int, step: int
) -> torch.Tensor:
    """Dataset indices of the global batch of ``step``: LongTensor [global_batch_size].

    Positions ``step*G .. step*G+G-1`` of the epoch-permutation stream (see module doc).
    """
    _check_nonneg("num_samples", num_samples)
    _check_nonneg("global_batch_size", global_batch_size)
    _check_nonneg("seed", seed)
    _check_nonneg("step", step)
    if num_samples == 0:
        raise ValueError("num_samples must be > 0, got 0 (empty dataset)")
    if global_batch_size == 0:
        raise ValueError("global_batch_size must be > 0, got 0")
    start = step * global_batch_size
    end = start + global_batch_size
    parts: list[torch.Tensor] = []
    pos = start
    while pos < end:
        epoch, offset = divmod(pos, num_samples)
        take = min(end - pos, num_samples - offset)
        perm = _epoch_permutation(num_samples, seed, epoch)
        parts.append(perm[offset : offset + take].clone())
        pos += take
    return torch.cat(parts)


def _check_layout(global_batch_size: int, dp_rank: int, dp_degree: int) -> int:
    _check_nonneg("dp_rank", dp_rank)
    _check_nonneg("dp_degree", dp_degree)
    if dp_degree == 0:
        raise ValueError("dp_degree must be > 0, got 0")
    if dp_rank >= dp_degree:
        raise ValueError(f"dp_rank ({dp_rank}) must be < dp_degree ({dp_degree})")
    if global_batch_size % dp_degree != 0:
        raise ValueError(
            f"global batch size ({global_batch_size}) is not divisible by dp_degree ({dp_degree})"
        )
    return global_batch_size // dp_degree


def rank_slice(global_indices: torch.Tensor, dp_rank: int, dp_degree: int) -> torch.Tensor:
    """Contiguous slice of the global batch held by ``dp_rank``: [G / dp_degree]."""
    if global_indices.dim() != 1:
        raise ValueError(f"global_indices must be 1-D, got shape {tuple(global_indices.shape)}")
    micro = _check_layout(global_indices.numel(), dp_rank, dp_degree)
    return global_indices[dp_rank * micro : (dp_rank + 1) * micro]


def rank_sample_ids(global_batch_size: int, dp_rank: int, dp_degree: int) -> torch.Tensor:
    """Positions in the global batch (the ``sample_ids`` of the per-sample draws) of a rank."""
    micro = _check_layout(global_batch_size, dp_rank, dp_degree)
    return torch.arange(dp_rank * micro, (dp_rank + 1) * micro, dtype=torch.long)


def per_sample_generator(
    seed: int, step: int, global_index: int, stream: int = NOISE_STREAM
) -> torch.Generator:
    """CPU generator for one sample's draws: seeded by SeedSequence((tag, seed, step, index, stream)).

    ``global_index`` is the sample's position in the global batch (0..G-1).
    """
    _check_nonneg("seed", seed)
    _check_nonneg("step", step)
    _check_nonneg("global_index", global_index)
    _check_nonneg("stream", stream)
    g = torch.Generator(device="cpu")
    g.manual_seed(_seed_from_key(_SAMPLE_DOMAIN, seed, step, int(global_index), stream))
    return g


def _ids_list(sample_ids: torch.Tensor) -> list[int]:
    if sample_ids.dim() != 1:
        raise ValueError(f"sample_ids must be 1-D, got shape {tuple(sample_ids.shape)}")
    if sample_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"sample_ids must be an integer tensor, got dtype {sample_ids.dtype}")
    ids = sample_ids.tolist()
    if ids and min(ids) < 0:
        raise ValueError(f"sample_ids must be >= 0, got min {min(ids)}")
    return ids


def per_sample_normal(
    seed: int,
    step: int,
    sample_ids: torch.Tensor,
    shape: Sequence[int],
    stream: int = NOISE_STREAM,
) -> torch.Tensor:
    """Standard normal draws, one independent block per sample: float32 [n, *shape] on CPU."""
    ids = _ids_list(sample_ids)
    shape = tuple(int(s) for s in shape)
    out = torch.empty((len(ids), *shape), dtype=torch.float32)
    for row, gid in enumerate(ids):
        # One generator per sample is what makes the draw independent of batch composition.
        out[row] = torch.randn(shape, generator=per_sample_generator(seed, step, gid, stream))
    return out


def per_sample_uniform(seed: int, step: int, sample_ids: torch.Tensor, stream: int) -> torch.Tensor:
    """One U[0, 1) draw per sample: float32 [n] on CPU. Use a distinct ``stream`` per quantity
    (TIME_STREAM, LABEL_DROP_STREAM, FLIP_STREAM); NOISE_STREAM belongs to per_sample_normal."""
    ids = _ids_list(sample_ids)
    out = torch.empty(len(ids), dtype=torch.float32)
    for row, gid in enumerate(ids):
        out[row] = torch.rand((), generator=per_sample_generator(seed, step, gid, stream))
    return out


def validate_batch_request(
    indices: torch.Tensor, flip: torch.Tensor, num_samples: int, source: str
) -> None:
    """Shared argument check of ``get_batch(indices, flip)`` for every dataset in this package."""
    if indices.dim() != 1 or indices.dtype != torch.long:
        raise ValueError(
            f"{source}: indices must be a 1-D LongTensor, got shape {tuple(indices.shape)} "
            f"dtype {indices.dtype}"
        )
    if flip.dim() != 1 or flip.dtype != torch.bool or flip.numel() != indices.numel():
        raise ValueError(
            f"{source}: flip must be a 1-D BoolTensor of length {indices.numel()}, got shape "
            f"{tuple(flip.shape)} dtype {flip.dtype}"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_samples):
        raise ValueError(
            f"{source}: indices must lie in [0, {num_samples}), got min {int(indices.min())} "
            f"max {int(indices.max())}"
        )
