"""One batch of samples: the labels to condition on, the noise, the guided sampler of the objective.

Noise comes from (sample.seed, global sample index), so a sample does not depend on how many ranks
drew it or on which batch it fell into (its batch-mates still matter under the paper's pool rule,
see models/moe.py). The sampler belongs to the checkpoint's objective (transport/objective.py: flow
euler | heun | dopri5 | sde, ddpm ddpm | ddim); classifier-free guidance is transport/cfg.py's, on
every latent channel the objective guides. The model runs under the sampling precision
(``sample.precision``: bf16 autocast for the model only, the ODE stays fp32).
"""

from __future__ import annotations

import torch

from diffmoe_dist.config import Config
from diffmoe_dist.inference.capacity import CapacityMeter
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.parallel.numerics import resolve_sample_precision, sampling_autocast
from diffmoe_dist.transport.cfg import cfg_velocity_fn
from diffmoe_dist.transport.objective import cfg_pool_for, get_objective


def class_labels(cfg: Config, labels_arg: str | None) -> torch.Tensor:
    """The class of every sample [sample.num_samples]: ``--labels a,b,...`` cycled, else a balanced
    grid for at most 10 classes, else uniform draws from ``sample.seed``. ValueError names --labels."""
    n, k = cfg.sample.num_samples, cfg.model.num_classes
    if labels_arg:
        try:
            given = [int(v) for v in labels_arg.split(",")]
        except ValueError:
            raise ValueError(
                f"--labels {labels_arg!r}: expected comma-separated class indices (integers), "
                "e.g. --labels 0,3,7"
            ) from None
        bad = [v for v in given if not 0 <= v < k]
        if bad:
            raise ValueError(f"--labels: classes {bad} outside [0, {k})")
        return torch.tensor([given[i % len(given)] for i in range(n)])
    if k <= 10 and n % k == 0:  # small class counts: a balanced grid, row r = class r % k
        return torch.arange(n) % k
    g = torch.Generator().manual_seed(cfg.sample.seed)
    return torch.randint(0, k, (n,), generator=g)


@torch.no_grad()
def generate(
    model: DiffMoE,
    cfg: Config,
    labels: torch.Tensor,
    seed_offset: int | torch.Tensor,
    device: torch.device,
    meter: CapacityMeter,
) -> torch.Tensor:
    """Sample one batch: noise from (sample.seed, global sample index), so results do not depend on ranks.

    ``seed_offset``: the global index of the first sample (indices consecutive), or all indices [B].
    """
    m, s = cfg.model, cfg.sample
    shape = (m.in_channels, m.input_size, m.input_size)
    if isinstance(seed_offset, torch.Tensor):
        offsets = [int(v) for v in seed_offset.tolist()]
    else:
        offsets = [seed_offset + i for i in range(len(labels))]
    z0 = torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(s.seed * 1_000_003 + o))
            for o in offsets
        ]
    ).to(device)

    obj = get_objective(cfg.objective)
    precision = resolve_sample_precision(s.precision, device)

    def counted(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with sampling_autocast(precision, device):  # bf16: the model only; the ODE stays fp32
            out = model(x, t, y).float()
        meter.add(model, obj.flow_time(t), y)  # telemetry buckets in the flow convention
        return out

    vfn = cfg_velocity_fn(
        counted,
        labels.to(device),
        s.cfg_scale,
        m.num_classes,
        pool_mode=cfg_pool_for(cfg),
        guided_channels=obj.guided_channels(m.in_channels),
    )
    # Stochastic samplers (flow sde, ddpm ancestral) draw from one generator per batch.
    gen = torch.Generator(device=device).manual_seed(s.seed + offsets[0])
    return obj.sample(s.sampler, vfn, z0, s.num_steps, gen).x
