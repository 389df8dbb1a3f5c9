"""What the studies share, written once: launching a training as a real subprocess (environment,
log file, timeout, the child's own error line), the versions and git revision a report records,
Markdown tables, result JSON written atomically, and generated sections inside hand-written docs.

Every study has the same shape: a typed spec (what to run, checked before anything runs), a runner
(the trainings / samplings, through the package's entry points), and a report (tables, plots). The
package takes explicit paths; only ``tools/*.py`` resolve defaults inside the repository.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffmoe_dist
from diffmoe_dist.parallel.launch_env import TORCHRUN_VARS

# The directory that holds the imported diffmoe_dist: put first on the children's PYTHONPATH so a
# training launched by a study runs the same code as the study (a checkout, not an older install).
PACKAGE_ROOT = Path(diffmoe_dist.__file__).resolve().parents[1]
# A study run under torchrun / SLURM must not pass its own rank identity on to the runs it starts.
LAUNCHER_IDENTITY = TORCHRUN_VARS


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """``"16,32"`` -> (16, 32); ValueError naming ``flag`` unless every value is an integer >= 1."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from e
    if any(v < 1 for v in values):
        raise ValueError(f"{flag}: every value must be >= 1, got {values}")
    return values


# ----------------------------------------------------------------------------------------------------
# launching


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child run: ``extra`` added, PACKAGE_ROOT first on
    PYTHONPATH, no launcher identity, one OpenMP thread unless the caller chose otherwise."""
    env = {**os.environ, **(extra or {})}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    for key in LAUNCHER_IDENTITY:
        env.pop(key, None)
    return env


def train_command(
    config: str | os.PathLike[str], overrides: Sequence[str], nproc: int = 1
) -> list[str]:
    """One node: ``python -m diffmoe_dist.train`` (1 rank) or ``torchrun --standalone`` (several)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
        cmd += [f"--nproc-per-node={nproc}"]
    cmd += ["-m", "diffmoe_dist.train", "--config", str(config)]
    return cmd + [a for item in overrides for a in ("--set", item)]


@dataclass(frozen=True)
class Outcome:
    """How one launched command ended."""

    returncode: int  # 124: killed at the timeout
    wall_s: float
    log: Path
    error: str  # "" when it succeeded; else the child's own "<prog>: error:" line or the last one

    def check(self) -> Outcome:
        """RuntimeError with the log's tail unless the command succeeded."""
        if self.returncode != 0:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"command failed (rc {self.returncode}): see {self.log}\n--- tail ---\n{tail}"
            )
        return self


def run_logged(
    cmd: Sequence[str],
    log_path: Path,
    env_extra: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> Outcome:
    """Run ``cmd`` to completion with stdout and stderr in ``log_path`` (first line: the command).

    With a timeout the child gets its own session, so the timeout (or this process being stopped)
    kills it with every process it started (torchrun's workers, srun's steps) and nothing else.
    Without one it stays in the terminal's process group, so Ctrl-C reaches every run at once (a
    study running several runs in threads could not stop them one by one).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            list(cmd),
            env=child_env(env_extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=timeout_s is not None,
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except BaseException as e:  # the timeout, or Ctrl-C / SIGTERM of the study itself
            if timeout_s is None:
                proc.kill()
            else:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the session this call started
                except ProcessLookupError:
                    pass
            proc.wait()
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            rc = 124
    wall = time.perf_counter() - t0
    if rc == 0:
        return Outcome(0, wall, log_path, "")
    if rc == 124:
        return Outcome(rc, wall, log_path, f"timed out after {timeout_s:.0f}s")
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines()[1:] if ln.strip()]
    # The first "<prog>: error: ..." line is the trainer's own message; else the last error-ish line.
    err = next((ln for ln in lines if ": error:" in ln), "") or next(
        (ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else ""
    )
    return Outcome(rc, wall, log_path, err.strip()[:300] or f"exit code {rc}")


# ----------------------------------------------------------------------------------------------------
# what a report records


def git_revision(path: Path = PACKAGE_ROOT) -> str:
    """The commit of the checkout holding ``path`` (marked when it has uncommitted changes)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" (with uncommitted changes)" if dirty else "")


def versions() -> dict[str, str]:
    """Python, the numeric libraries, the code's git revision and the machine, for a report."""
    import numpy
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    out["numpy"] = numpy.__version__
    try:
        import sklearn  # the digits judge's features

        out["scikit-learn"] = sklearn.__version__
    except ImportError:
        pass
    out["git commit"] = git_revision()
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores visible{gpu}"
    return out


def versions_line(vers: Mapping[str, str]) -> str:
    """``versions()`` as one Markdown sentence."""
    return "Versions: " + "; ".join(f"{k} {v}" for k, v in vers.items()) + "."


# ----------------------------------------------------------------------------------------------------
# writing results


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; a ``|`` inside a cell becomes ``/`` so it cannot split the cell."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    return "\n".join(lines) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so a reader sees the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically (paths and other non-JSON values as strings)."""
    write_text_atomic(path, json.dumps(obj, indent=1, default=str))


def replace_section(path: Path, section: str, begin: str, end: str, title: str) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) into the doc ``path``:
    replace the text between an existing ``begin`` / ``end`` pair in place, keeping everything else
    (hand-written reading, other sections); else append it; a new file starts with ``title``."""
    if path.is_file():
        text = path.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + section.rstrip("\n") + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = f"# {title}\n\n{section}"
    write_text_atomic(path, text)
