"""The project's collective wrappers (parallel/distributed.py): device checks, host data through the
device, rank-0 work longer than the process-group timeout (checkpoint publishing), and the rule that
no module calls torch.distributed collectives directly (issue 18 items 1 and 5).

NCCL itself cannot run here (no GPU): the NCCL rule is checked by giving the check the backend name
an NCCL group would report; everything else runs on real 2-rank gloo groups.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from dist_utils import DistributedError, run_distributed

from diffmoe_dist.parallel.distributed import check_collective_tensors, choose_cuda_device

PKG = Path(__file__).resolve().parents[1] / "diffmoe_dist"
RAW_COLLECTIVE = re.compile(
    r"\b(?:dist|torch\.distributed)\.(?:all_reduce|all_gather\w*|reduce\w*|broadcast\w*|barrier|"
    r"gather\w*|scatter\w*|all_to_all\w*|monitored_barrier)\("
)
# The expert all-to-all moves model activations, which are on the device by construction. The
# planner check's link probe times the raw gloo collectives themselves, on CPU tensors it makes in
# its own spawned processes (a wrapper's checks would be part of what it measures).
ALLOWED = {"parallel/distributed.py", "parallel/comm.py", "planner/check.py"}


def test_no_module_calls_collectives_directly() -> None:
    found = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).as_posix()
        if rel in ALLOWED:
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if RAW_COLLECTIVE.search(line.split("#")[0]):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "collectives outside parallel/distributed.py:\n" + "\n".join(found)


def test_nccl_group_refuses_cpu_tensors() -> None:
    cpu = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"tensor 0 \(3,\) torch.float32 is on cpu.*cuda:0"):
        check_collective_tensors([cpu], torch.device("cuda", 0), "nccl", "all_reduce")
    with pytest.raises(RuntimeError, match="takes CUDA tensors only.*device is cpu"):
        check_collective_tensors([cpu], torch.device("cpu"), "nccl", "all_reduce")
    check_collective_tensors([cpu], torch.device("cpu"), "gloo", "all_reduce")
    meta = torch.empty(2, device="meta")  # a tensor on another device than the trainer's
    with pytest.raises(RuntimeError, match="is on meta"):
        check_collective_tensors([cpu, meta], torch.device("cpu"), "gloo", "x")


@pytest.mark.parametrize(
    ("local_rank", "count", "want"),
    [
        (0, 8, 0),  # torchrun: the node's 8 GPUs shared by 8 workers
        (5, 8, 5),
        (3, 1, 0),  # srun --gpus-per-task=1: every task sees its own GPU as cuda:0
        (0, 1, 0),
    ],
)
def test_cuda_device_choice(local_rank: int, count: int, want: int) -> None:
    # The device count is injected: no GPU here. With CUDA_VISIBLE_DEVICES=<one id> per task (what
    # srun --gpus-per-task=1 sets) torch.cuda.device_count() is 1.
    assert choose_cuda_device(local_rank, count) == want


def test_cuda_device_choice_refuses_shared_shortage() -> None:
    with pytest.raises(ValueError, match="local rank 3 has no GPU: 2 visible"):
        choose_cuda_device(3, 2)
    with pytest.raises(ValueError, match="no CUDA device"):
        choose_cuda_device(0, 0)


# ---- real gloo groups ---------------------------------------------------------------------------
def _collectives(rank: int, world: int, tmp: str) -> dict:
    import torch.distributed as dist

    from diffmoe_dist.checkpoint import CheckpointManager, manifest
    from diffmoe_dist.config import Config
    from diffmoe_dist.parallel.distributed import (
        all_reduce_scalars,
        gather_rows_to_rank0,
        run_on_rank0,
    )

    cpu = torch.device("cpu")
    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=1.5))
    out: dict = {"scalars": all_reduce_scalars([rank + 1.0, 2.0 * rank], group, cpu, op="mean")}
    out["max"] = all_reduce_scalars([float(rank)], group, cpu, op="max")
    rows = torch.arange(5 * 3, dtype=torch.uint8).view(5, 3) + 100 * rank
    gathered = gather_rows_to_rank0(rows, group, cpu, max_chunk_bytes=2 * 3 * world)  # 2-row chunks
    out["gathered"] = None if gathered is None else gathered.tolist()

    # rank 0 works 2 s, longer than the group's 1.5 s timeout: the others wait on the store
    def slow() -> str:
        time.sleep(2.0)
        return "done"

    out["rank0"] = run_on_rank0(slow, group, 60, "slow job")

    def fail() -> str:
        raise OSError("disk full")

    try:
        run_on_rank0(fail, group, 60, "failing job")
    except (OSError, RuntimeError) as e:
        out["error"] = f"{type(e).__name__}: {e}"

    # A checkpoint whose hashing takes longer than the process-group timeout still saves.
    real = manifest.sha256_file

    def slow_sha(path):  # type: ignore[no-untyped-def]
        time.sleep(0.4)
        return real(path)

    manifest.sha256_file = slow_sha  # the manifest writer and verify_checkpoint hash through it
    cfg = Config()
    model = torch.nn.Linear(4, 4)
    torch.manual_seed(0)
    ckpt = CheckpointManager(tmp, cfg, rank, world, group)
    path = ckpt.save(1, model, None, None)
    out["saved"] = path.name
    out["latest"] = str(ckpt.latest_valid())  # verification hashes again: slower than 1.5 s too

    # The same wait as a barrier trips the timeout: what the checkpoint code did before.
    try:
        if rank == 0:
            time.sleep(2.0)
        dist.barrier(group=group)
        out["barrier"] = "ok"
    except RuntimeError as e:
        out["barrier"] = f"timeout: {str(e)[:80]}"
    return out


def test_wrappers_and_rank0_wait_on_gloo(tmp_path: Path) -> None:
    try:
        res = run_distributed(
            _collectives, 2, args=(str(tmp_path),), timeout_s=120, pg_timeout_s=1.5
        )
    except DistributedError as e:
        pytest.fail(str(e))
    assert res[0]["scalars"] == res[1]["scalars"] == [1.5, 1.0]
    assert res[0]["max"] == [1.0]
    want = (torch.arange(15).view(5, 3)).tolist() + (torch.arange(15).view(5, 3) + 100).tolist()
    assert res[0]["gathered"] == want and res[1]["gathered"] is None
    assert res[0]["rank0"] == res[1]["rank0"] == "done"
    assert res[0]["error"] == "OSError: disk full"
    assert res[1]["error"] == "RuntimeError: failing job failed on rank 0: OSError: disk full"
    assert res[0]["saved"] == res[1]["saved"] == "step-00000001"
    assert res[0]["latest"] == res[1]["latest"] == str(tmp_path / "checkpoints" / "step-00000001")
    # on gloo the waiting rank's barrier fails after the timeout (the old checkpoint path)
    assert res[1]["barrier"].startswith("timeout"), res[1]["barrier"]


# ---- process groups: how many communicators a layout costs (issue 18 item 13) ------------------
def _count_groups(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from diffmoe_dist.config import load_config
    from diffmoe_dist.parallel import parallelize

    created: list[list[int]] = []
    real = dist.new_group

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        created.append(list(kwargs.get("ranks") or args[0]))
        return real(*args, **kwargs)

    dist.new_group = counting
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    out = {}
    for name, sets in {
        "ep1": ["parallel.ep=1", "moe.pool_samples=4", "train.global_batch_size=16"],
        "ep4": ["parallel.ep=4", "moe.pool_samples=4", "train.global_batch_size=16"],
        # dp 2 x ep 2, each pool spans 2 ranks (micro-batch 2, pool 4)
        "ep2_span2": ["parallel.ep=2", "moe.pool_samples=4", "train.global_batch_size=8"],
    }.items():
        cfg = load_config(tiny, sets)
        before = len(created)
        ps = parallelize.build_parallel_state(cfg, world, rank)
        first = created[before:]
        for _ in range(3):  # what sample_from_checkpoint does once per call
            again = parallelize.build_parallel_state(cfg, world, rank)
        out[name] = {
            "first": first,
            "again": len(created) - before - len(first),
            "same": again.ep_group is ps.ep_group and again.pool_group is ps.pool_group,
            "world_is_default": ps.world_group is dist.group.WORLD,
            "none": [k for k in ("ep_group", "edp_group", "pool_group") if getattr(ps, k) is None],
        }
        if ps.ep_group is not None:  # the groups work
            t = torch.ones(1)
            dist.all_reduce(t, group=ps.ep_group)
            out[name]["ep_sum"] = float(t)
    return out


def test_process_groups_created_once_and_only_when_needed() -> None:
    res = run_distributed(_count_groups, 4, timeout_s=180)
    for r in res:
        # one process, ep 1: ep and pool groups would be 4 single ranks, edp the world: none created
        assert r["ep1"]["first"] == [] and r["ep1"]["none"] == ["ep_group", "pool_group"]
        assert r["ep4"]["first"] == [] and r["ep4"]["none"] == ["edp_group", "pool_group"]
        assert r["ep4"]["ep_sum"] == 4.0
        # ep groups {0,1} {2,3}, edp groups {0,2} {1,3}; the pools are the ep groups again
        assert r["ep2_span2"]["first"] == [[0, 1], [2, 3], [0, 2], [1, 3]]
        assert r["ep2_span2"]["ep_sum"] == 2.0
        for case in r.values():
            assert case["again"] == 0 and case["same"] and case["world_is_default"]
