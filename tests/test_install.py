"""`make demo` needs no root: its install path (tools/install.sh --venv) never reaches apt or sudo.

The install script runs for real in --dry-run mode (every decision is taken, nothing is changed) as a
non-root user (``nobody`` through setpriv when the tests run as root, as CI does) with ``sudo``,
``apt-get``, ``apt`` and ``dpkg*`` on PATH replaced by traps that record the call and fail. The full
non-root `make demo` (pip install into .venv, training) takes minutes and is the README's measured
proof, not part of the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_run import REPO

TRAPPED = ("sudo", "apt-get", "apt", "dpkg", "dpkg-query", "su")


def _make_n(target: str) -> str:
    res = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_make_targets_say_who_needs_root() -> None:
    demo = _make_n("demo")
    assert "tools/install.sh --venv .venv" in demo and "diffmoe-demo" in demo, demo
    assert not any(word in demo for word in ("sudo", "apt", "--system-packages")), demo
    test = _make_n("test")
    assert "install.sh --system-packages" in test and "tools/run_tests.sh" in test, test
    assert "needs root or sudo" in test, test  # said before anything is installed


@pytest.fixture()
def sandbox() -> Iterator[Path]:
    """A world-readable copy of what install.sh reads (the checkout may sit under a 0700 home)."""
    d = Path(tempfile.mkdtemp(prefix="install-test-", dir="/tmp"))
    try:
        for rel in ("Makefile", "setup.py", "constraints.txt", "tools/install.sh"):
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, d / rel)
        traps = d / "traps"
        traps.mkdir()
        for name in TRAPPED:
            (traps / name).write_text(
                f'#!/bin/sh\necho "{name} $*" >> {d}/trapped/calls\necho "trap: {name}" >&2\nexit 1\n'
            )
            (traps / name).chmod(0o755)
        (d / "trapped").mkdir()
        for p in [d, *d.rglob("*")]:
            p.chmod(0o777 if p.is_dir() else p.stat().st_mode | 0o444)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _base_python() -> str:
    """A Python >= 3.11 another user can run: the system one where it is (Debian 12: /usr/bin)."""
    for cand in ("/usr/bin/python3", shutil.which("python3") or ""):
        if cand and os.access(cand, os.X_OK) and not cand.startswith("/root/"):
            return cand
    pytest.skip("no python3 outside /root that a non-root user can run")


def test_demo_install_path_needs_no_root(sandbox: Path) -> None:
    cmd = ["bash", str(sandbox / "tools/install.sh"), "--venv", ".venv", "--dry-run"]
    user = "yourself"
    if os.geteuid() == 0:  # drop to nobody, as a user on a login node would be
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        user = "nobody"
    env = {
        "PATH": f"{sandbox / 'traps'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(sandbox),
        "BASE_PYTHON": _base_python(),
        "LANG": "C.UTF-8",
    }
    res = subprocess.run(cmd, cwd=sandbox, env=env, capture_output=True, text=True, timeout=120)
    calls = sandbox / "trapped" / "calls"
    assert not calls.exists(), f"the demo path called {calls.read_text()!r} as {user}"
    if "cannot create a venv" in res.stderr:  # Debian without python3-venv: the documented message
        assert "apt-get install python3-venv" in res.stderr and res.returncode == 1
        pytest.skip(f"{env['BASE_PYTHON']} has no ensurepip (python3-venv not installed)")
    assert res.returncode == 0, (res.stdout, res.stderr)
    out = res.stdout
    assert f"would run: {env['BASE_PYTHON']} -m venv {sandbox}/.venv" in out, out
    assert "torch==2.13.0+cpu" in out and "dry run: nothing changed" in out, out
    assert "apt" not in out.replace("apt-get install python3-venv", ""), out
    assert not (sandbox / ".venv").exists()


def test_system_packages_refused_with_venv(sandbox: Path) -> None:
    res = subprocess.run(
        ["bash", "tools/install.sh", "--venv", ".venv", "--system-packages", "--dry-run"],
        cwd=sandbox,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "never touches the system" in res.stderr, res
