"""Named model sizes of the paper (patch 2, 256 px / 32x32x4 latents, MoE on every other block).

A name sets the architecture (depth, width, heads) and the routing (mode, number of experts); the
rest of the config (data, capacity, pool size) is left as configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffmoe_dist.config import Config

# size -> (depth, hidden_size, num_heads), as DiT-S/B/L/XL.
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
# family prefix -> routing mode
FAMILIES = {"DiffMoE": "diffmoe", "TC-DiT": "tc", "EC-DiT": "ec"}


def _build_registry() -> dict[str, dict[str, Any]]:
    reg: dict[str, dict[str, Any]] = {}
    for size, (depth, width, heads) in SIZES.items():
        arch = {"depth": depth, "hidden_size": width, "num_heads": heads}
        reg[f"Dense-DiT-{size}"] = {"model": arch, "moe": {"mode": "dense"}}
        for family, mode in FAMILIES.items():
            for e in (2, 4, 8, 16):
                reg[f"{family}-{size}-E{e}"] = {
                    "model": arch,
                    "moe": {"mode": mode, "num_experts": e},
                }
    return reg


REGISTRY: dict[str, dict[str, Any]] = _build_registry()


def apply_preset(cfg: Config, name: str) -> None:
    """Set the architecture and routing fields of ``cfg`` from the registry entry ``name``."""
    if name not in REGISTRY:
        raise ValueError(
            f"config key 'model.name' = {name!r} is not a registered model; known: "
            f"{', '.join(sorted(REGISTRY))}"
        )
    entry = REGISTRY[name]
    for key, value in entry["model"].items():
        setattr(cfg.model, key, value)
    for key, value in entry["moe"].items():
        setattr(cfg.moe, key, value)
    cfg.model.name = name
