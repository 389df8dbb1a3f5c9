"""Named model sizes of the paper (patch 2, 256 px / 32x32x4 latents, MoE on every other block).

A name sets the architecture (depth, width, heads) and the routing (mode, number of experts); the
rest of the config (data, capacity, pool size) is left as configured. This module is a table: it
knows nothing of the config tree. ``preset(name)`` returns the entry as config sections
({"model": {...}, "moe": {...}}); config.py lays it under the user's keys (``model.name``).
"""

from __future__ import annotations

from typing import Any

# size -> (depth, hidden_size, num_heads), as DiT-S/B/L/XL.
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
# family prefix -> routing mode (models/moe.py ROUTING_MODES); Dense-DiT-<size> has no experts.
FAMILIES: dict[str, str] = {
    "Dense-DiT": "dense",
    "DiffMoE": "diffmoe",
    "TC-DiT": "tc",
    "EC-DiT": "ec",
}
EXPERT_COUNTS = (2, 4, 8, 16)


def _build_registry() -> dict[str, dict[str, Any]]:
    reg: dict[str, dict[str, Any]] = {}
    for size, (depth, width, heads) in SIZES.items():
        arch = {"depth": depth, "hidden_size": width, "num_heads": heads}
        for family, mode in FAMILIES.items():
            if mode == "dense":
                reg[f"{family}-{size}"] = {"model": arch, "moe": {"mode": mode}}
                continue
            for e in EXPERT_COUNTS:
                reg[f"{family}-{size}-E{e}"] = {
                    "model": arch,
                    "moe": {"mode": mode, "num_experts": e},
                }
    return reg


REGISTRY: dict[str, dict[str, Any]] = _build_registry()


def preset(name: str) -> dict[str, dict[str, Any]]:
    """The registry entry ``name`` as config sections (a fresh copy); ValueError naming the known
    names when there is none."""
    if name not in REGISTRY:
        raise ValueError(
            f"config key 'model.name' = {name!r} is not a registered model; known: "
            f"{', '.join(sorted(REGISTRY))}"
        )
    return {section: dict(values) for section, values in REGISTRY[name].items()}
