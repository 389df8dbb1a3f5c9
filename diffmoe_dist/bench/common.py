"""What the benchmarks share: their command-line integer lists and the top-level JSON shape check."""

from __future__ import annotations

from typing import Any


def parse_ints(text: str, flag: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]; SystemExit naming ``--flag`` unless all are positive integers."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--{flag} {text!r}: expected comma-separated integers") from None
    if not vals or min(vals) < 1:
        raise SystemExit(f"--{flag} {text!r}: expected positive integers")
    return vals


def check_cases(
    result: dict, required: tuple[str, ...], optional: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The cases of a ``{"device", "cases"}`` result; ValueError naming the case and its keys when
    one lacks a required key or has a key neither required nor optional."""
    if set(result) != {"device", "cases"} or not isinstance(result["cases"], list):
        raise ValueError(f"top-level keys {sorted(result)}; expected ['cases', 'device']")
    for i, c in enumerate(result["cases"]):
        missing = [k for k in required if k not in c]
        extra = [k for k in c if k not in required + optional]
        if missing or extra:
            raise ValueError(f"case {i}: missing keys {missing}, unknown keys {extra}")
    return result["cases"]
