"""One trainer per run directory: an exclusive ``flock`` on ``<run.dir>/trainer.lock``, held by rank 0.

The lock belongs to the open file, so the kernel drops it when the process dies in any way (kill -9,
OOM, node reboot for a local file system): a crash never leaves a stale lock to clean by hand. The
file itself stays and holds the last holder's host, pid and start time, which is what a second
trainer reports when it is refused. Readers (sample, eval, sweeps) never open it.

On a shared file system (several nodes) flock needs a file system that forwards it (NFSv4, Lustre
with ``-o flock``, GPFS); on one without lock support ``flock`` raises and the trainer says so.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "trainer.lock"


class RunDirLocked(ValueError):
    """Another live process holds the run directory."""


class RunDirLock:
    """``acquire()`` or ValueError naming the directory and the holder; ``release()`` is idempotent."""

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC by default in Python
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(
                    f"run.dir '{self.run_dir}' is held by another trainer (host "
                    f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
                    f"{holder.get('started', '?')}; lock {self.path}). One trainer per run "
                    "directory: stop that one or use another run.dir"
                ) from None
            raise ValueError(
                f"cannot lock run.dir '{self.run_dir}' ({self.path}): {e.strerror}; the file "
                "system must support flock"
            ) from None
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __del__(self) -> None:  # an abandoned Trainer object (tests) gives the run back
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
