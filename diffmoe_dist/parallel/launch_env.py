"""Where this process sits in the job, whichever launcher started it.

The trainer calls `resolve_launch_env()` once, before `init_process_group("env://")`. After the call
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are set in `os.environ`, so the same
`init_process_group` line works under every launcher:

- torchrun (also inside SLURM via launchers/slurm_train.sh): its variables are used as they are,
  except after an elastic restart (see `_fresh_store_after_restart`).
- mpirun / mpiexec (MPICH: PMI_RANK, Open MPI: OMPI_COMM_WORLD_RANK, PMIx: PMIX_RANK): rank and size
  come from MPI.COMM_WORLD, the local rank from a split by shared memory (= ranks on this host), and
  rank 0 picks a free TCP port on its own host and broadcasts it with its address.
- srun without torchrun (SLURM_PROCID with SLURM_NTASKS): ranks from SLURM, master = first node of
  the job, port derived from the job id (every task computes the same one without talking).
- otherwise a single process (rank 0 of 1, localhost, a free port).

mpi4py is imported only on the MPI path, so nothing else needs it installed.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Literal

LaunchSource = Literal["torchrun", "mpi", "slurm", "single"]

# Environment variables whose presence means "an MPI launcher started this process".
_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job (global rank, world size, rank on this host)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: LaunchSource

    def export(self) -> None:
        """Write the torch `env://` variables, so `init_process_group("env://")` finds them."""
        os.environ["RANK"] = str(self.rank)
        os.environ["WORLD_SIZE"] = str(self.world_size)
        os.environ["LOCAL_RANK"] = str(self.local_rank)
        os.environ["MASTER_ADDR"] = self.master_addr
        os.environ["MASTER_PORT"] = str(self.master_port)


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _free_port(host: str = "") -> int:
    """A TCP port that is free right now on this host (bind to port 0, read what the OS gave)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _this_host_address() -> str:
    """An address of this host that other hosts can reach: the hostname if it resolves, else 127.0.0.1."""
    name = socket.gethostname()
    try:
        socket.getaddrinfo(name, None)
    except OSError:
        return "127.0.0.1"
    return name


def _from_torchrun() -> LaunchEnv:
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ValueError(
            f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "launch with torchrun, or set all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"
        )
    env = LaunchEnv(
        rank=_int_env("RANK"),
        world_size=_int_env("WORLD_SIZE"),
        local_rank=_int_env("LOCAL_RANK"),
        master_addr=os.environ["MASTER_ADDR"],
        master_port=_int_env("MASTER_PORT"),
        source="torchrun",
    )
    _check(env)
    return _fresh_store_after_restart(env)


def _fresh_store_after_restart(env: LaunchEnv) -> LaunchEnv:
    """After a torchrun restart, point env:// at a new store hosted by rank 0.

    torchrun's workers share the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE=True) without a
    per-attempt prefix, so after a restart (`--max-restarts`, a worker was killed) the keys the dead
    attempt wrote are still there: `new_group` then reads a dead rank's Gloo address and fails with
    "connectFullMesh ... Connection refused" (torch 2.13, reproduced in tests/test_launchers.py).
    From attempt 1 on, rank 0 therefore picks a free port on its own host, publishes host:port in the
    agent store under a key unique to this attempt, and every rank uses that address with its own
    store (TORCHELASTIC_USE_AGENT_STORE=False: env:// makes rank 0 host a fresh TCPStore there).
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return env
    from torch.distributed import TCPStore

    agent_store = TCPStore(
        env.master_addr, env.master_port, is_master=False, timeout=timedelta(seconds=300)
    )
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    key = f"diffmoe_launch_env/{run_id}/attempt_{restart}/master"
    if env.rank == 0:
        agent_store.set(key, f"{_this_host_address()}:{_free_port()}")
    host, port = agent_store.get(key).decode().rsplit(":", 1)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    return replace(env, master_addr=host, master_port=int(port))


def _from_mpi() -> LaunchEnv:
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ValueError(
            "launched by an MPI launcher (PMI_RANK/OMPI_COMM_WORLD_RANK/PMIX_RANK is set) but mpi4py is "
            "not importable: pip install -c constraints.txt mpi4py mpich"
        ) from err
    world = MPI.COMM_WORLD
    rank, world_size = world.Get_rank(), world.Get_size()
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)  # the ranks on this host
    local_rank = node.Get_rank()
    node.Free()
    master = (_this_host_address(), _free_port()) if rank == 0 else None
    master_addr, master_port = world.bcast(master, root=0)
    env = LaunchEnv(rank, world_size, local_rank, master_addr, master_port, "mpi")
    _check(env)
    return env


def _slurm_head_node() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return _this_host_address()
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise ValueError(
            f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol: {err}"
        ) from err
    return out.split()[0]


def _from_slurm() -> LaunchEnv:
    job_id = _int_env("SLURM_JOB_ID") if "SLURM_JOB_ID" in os.environ else 0
    env = LaunchEnv(
        rank=_int_env("SLURM_PROCID"),
        world_size=_int_env("SLURM_NTASKS"),
        local_rank=_int_env("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0,
        master_addr=_slurm_head_node(),
        # Same on every task without communication; 20000-29999 stays below the ephemeral range.
        master_port=int(os.environ.get("MASTER_PORT", 20000 + job_id % 10000)),
        source="slurm",
    )
    _check(env)
    return env


def _check(env: LaunchEnv) -> None:
    if env.world_size < 1:
        raise ValueError(f"world size must be >= 1, got {env.world_size} (from {env.source})")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(
            f"rank {env.rank} is outside [0, {env.world_size}) (world size, from {env.source})"
        )
    if env.local_rank < 0:
        raise ValueError(f"local rank must be >= 0, got {env.local_rank} (from {env.source})")
    if not 0 < env.master_port < 65536:
        raise ValueError(f"master port {env.master_port} is not a TCP port (from {env.source})")


def detect_launch_source() -> LaunchSource:
    """Which launcher started this process, judged from the environment only (no side effects)."""
    if "RANK" in os.environ:
        return "torchrun"
    if any(name in os.environ for name in _MPI_RANK_VARS):
        return "mpi"
    if (
        "SLURM_PROCID" in os.environ
        and "SLURM_NTASKS" in os.environ
        and "SLURM_STEP_ID" in os.environ
    ):
        return "slurm"
    return "single"


def resolve_launch_env() -> LaunchEnv:
    """Find rank / world size / master from the launcher and export them for `env://`.

    Under MPI this is a collective over MPI.COMM_WORLD (every rank must call it). Raises ValueError
    with the offending variable when the launcher's environment is inconsistent.
    """
    source = detect_launch_source()
    if source == "torchrun":
        env = _from_torchrun()
    elif source == "mpi":
        env = _from_mpi()
    elif source == "slurm":
        env = _from_slurm()
    else:
        env = LaunchEnv(0, 1, 0, "127.0.0.1", _free_port("127.0.0.1"), "single")
        # Keep a port the user chose for single-process runs.
        if "MASTER_PORT" in os.environ:
            env = LaunchEnv(0, 1, 0, "127.0.0.1", _int_env("MASTER_PORT"), "single")
    env.export()
    return env
