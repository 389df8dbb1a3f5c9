"""SIGUSR1 / SIGTERM -> "save and stop at the next step boundary".

The handlers are installed as the very first thing an entry point does (before the heavy imports
and the model build), so a signal that arrives during start-up is remembered instead of lost. The
trainer reads the flag at every step end and agrees on it across ranks.
"""

from __future__ import annotations

import signal
from typing import Any

_requested = False


def _handler(signum: int, frame: Any) -> None:
    global _requested
    _requested = True


def install() -> None:
    """Idempotent; silently skipped outside the main thread (e.g. inside some test harnesses)."""
    try:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            if signal.getsignal(sig) is not _handler:
                signal.signal(sig, _handler)
    except ValueError:
        pass


def requested() -> bool:
    return _requested


def reset() -> None:
    global _requested
    _requested = False
