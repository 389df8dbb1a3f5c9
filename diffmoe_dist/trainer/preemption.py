"""Signals -> "save and stop at the next step boundary".

- SIGUSR1 / SIGTERM (SLURM's --signal, scancel, a cluster's preemption): preemption. The trainer
  writes a checkpoint and ``<run.dir>/PREEMPTED`` and exits 0, so the launcher requeues the job.
- SIGINT (Ctrl-C): the same save, without the requeue marker; the trainer exits 130. A second SIGINT
  exits at once (``os._exit(130)``, nothing saved; the last checkpoint stands and a half-written save
  is ignored and cleaned by the next start). A second SIGINT within ``SIGINT_DEBOUNCE_S`` of the first
  counts as the same one: a terminal's Ctrl-C reaches every process of the foreground group and
  torchrun's agent then forwards its own SIGINT to the workers a moment later.

The handlers are installed as the very first thing an entry point does (before the heavy imports
and the model build), so a signal that arrives during start-up is remembered instead of lost. The
trainer reads the flag at every step end and agrees on it across ranks.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

SIGINT_DEBOUNCE_S = 1.0  # torchrun forwards within ms; 1 s leaves room on a loaded node

# what was asked: 0 nothing, INTERRUPT (SIGINT), PREEMPT (SIGUSR1 / SIGTERM); ranks agree on the MAX
NONE, INTERRUPT, PREEMPT = 0, 1, 2
_requested = NONE
_first_sigint: float | None = None


def _handler(signum: int, frame: Any) -> None:
    global _requested
    _requested = PREEMPT


def _sigint(signum: int, frame: Any) -> None:
    global _requested, _first_sigint
    now = time.monotonic()
    if _first_sigint is None:
        _first_sigint = now
        _requested = max(_requested, INTERRUPT)
        os.write(2, b"SIGINT: finishing the step and saving a checkpoint; Ctrl-C again exits now\n")
    elif now - _first_sigint > SIGINT_DEBOUNCE_S:
        os.write(2, b"second SIGINT: exiting now, nothing saved (the last checkpoint stands)\n")
        os._exit(130)


def install() -> None:
    """Idempotent; silently skipped outside the main thread (e.g. inside some test harnesses)."""
    try:
        for sig, fn in (
            (signal.SIGUSR1, _handler),
            (signal.SIGTERM, _handler),
            (signal.SIGINT, _sigint),
        ):
            if signal.getsignal(sig) is not fn:
                signal.signal(sig, fn)
    except ValueError:
        pass


def requested() -> bool:
    return _requested != NONE


def kind() -> int:
    """NONE, INTERRUPT or PREEMPT (the strongest signal received so far)."""
    return _requested


def reset() -> None:
    global _requested, _first_sigint
    _requested, _first_sigint = NONE, None
