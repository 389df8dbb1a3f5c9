"""The collective and numerics checks of tools/gpu_smoke.sh, on every rank of a torchrun job.

    torchrun --standalone --nproc-per-node N tools/gpu_smoke_checks.py --out checks.json
    (the tool is a shell over ``main`` here; ``python -m diffmoe_dist.parallel.gpu_checks`` is the same)

Each check is what a CPU run on gloo cannot show (docs/gpu.md): the collective wrappers on NCCL
with host data (issue 18 item 1), the device a rank picks (4), rank 0 working past the process-group
timeout while the others wait on the store (5), all-to-all time from CUDA events (7), bf16 dispatch
bytes on the GPU (10), deterministic index_add_ (9). Rank 0 writes ``--out`` (JSON: check -> ok and
detail); the exit code is 1 when a check failed. ``--device cpu`` runs the same on gloo (wiring only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from diffmoe_dist.parallel import distributed as pd

TIMEOUT_S = 10  # process-group timeout of this job: the rank-0 check outlasts it on purpose


def check_wrappers(info: pd.DistInfo, group: Any) -> str:
    dev, W, r = info.device, info.world_size, info.rank
    got = pd.all_reduce_scalars([float(r), 1.0], group, dev, op="mean")
    assert got == [(W - 1) / 2, 1.0], got
    rows = torch.full((3, 4, 4, 3), r, dtype=torch.uint8)  # uint8 "images" on the host
    gathered = pd.gather_rows_to_rank0(rows, group, dev, max_chunk_bytes=64 * W)
    if r == 0:
        assert gathered is not None and gathered.shape == (3 * W, 4, 4, 3)
        assert gathered[:, 0, 0, 0].tolist() == [i // 3 for i in range(3 * W)]
    if dev.type == "cuda":  # the check must refuse a CPU tensor before NCCL sees it
        try:
            pd.all_reduce(torch.zeros(1), group, dev)
        except RuntimeError as e:
            assert "is on cpu" in str(e), e
        else:
            raise AssertionError("a CPU tensor passed the NCCL device check")
    refused = ", CPU tensor refused" if dev.type == "cuda" else ""
    return f"scalars, uint8 gather through {dev}{refused}"


def check_device(info: pd.DistInfo, group: Any) -> str:
    if info.device.type != "cuda":
        return "cpu run"
    want = pd.choose_cuda_device(info.local_rank, torch.cuda.device_count())
    assert info.device.index == want == torch.cuda.current_device(), (info.device, want)
    return f"local rank {info.local_rank} -> {info.device} ({torch.cuda.get_device_name()})"


def check_rank0_wait(info: pd.DistInfo, group: Any) -> str:
    t0 = time.monotonic()
    out = pd.run_on_rank0(lambda: time.sleep(TIMEOUT_S + 5) or "ok", group, 120, "rank-0 job")
    pd.barrier(group)  # the group is still usable afterwards
    return f"{out} after {time.monotonic() - t0:.1f} s (group timeout {TIMEOUT_S} s)"


def check_a2a_timing(info: pd.DistInfo, group: Any) -> str:
    from diffmoe_dist.parallel.comm import all_to_all_single
    from diffmoe_dist.parallel.dispatch import CollectiveTimer

    if info.world_size < 2:
        return "one rank: no all-to-all"
    dev, W = info.device, info.world_size
    x = torch.randn(W * 1024, 1024, device=dev)
    clock = CollectiveTimer()
    if dev.type == "cuda" and info.rank == 0:
        torch.cuda._sleep(int(2e8))  # rank 0 arrives late: the others' a2a waits on the GPU
    t0 = time.perf_counter()
    tok = clock.start(dev)
    all_to_all_single(x, [1024] * W, [1024] * W, group)
    clock.stop(tok)
    host = time.perf_counter() - t0
    measured = clock.seconds()
    wait = pd.all_reduce_scalars([measured], group, dev, op="max")[0]
    if dev.type == "cuda":
        assert wait > 10 * host or wait > 0.05, (wait, host)
    return f"max event time {wait * 1e3:.1f} ms; host clock around the call {host * 1e3:.2f} ms"


def check_bf16_dispatch(info: pd.DistInfo, group: Any, config: Path) -> str:
    from diffmoe_dist.config import load_config
    from diffmoe_dist.models.dit import DiffMoE
    from diffmoe_dist.parallel.dispatch import a2a_bytes_summary
    from diffmoe_dist.parallel.parallelize import build_parallel_state, parallelize_model

    W = info.world_size
    ep = max(e for e in (1, 2, 4, 8) if e <= W and W % e == 0 and 8 % e == 0)
    if ep == 1:
        return "ep 1: no all-to-all"
    cfg = load_config(
        config,
        [
            f"parallel.ep={ep}",
            "moe.num_experts=8",
            f"train.global_batch_size={4 * W}",
            "moe.pool_samples=4",
            f"parallel.backend={'nccl' if info.device.type == 'cuda' else 'gloo'}",
        ],
    )
    ps = build_parallel_state(cfg, W, info.rank)
    torch.manual_seed(0)
    model = parallelize_model(DiffMoE(cfg.model, cfg.moe), ps).to(info.device).train()
    x = torch.randn(4, 1, 16, 16, device=info.device)
    t = torch.rand(4, device=info.device)
    y = torch.randint(0, 10, (4,), device=info.device)
    sent = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=bf16):
            v = model(x, t, y)
        v.float().square().mean().backward()
        sent[name] = a2a_bytes_summary(model)["total"]["tokens_sent"]
    assert sent["fp32"] > 0 and sent["bf16"] * 2 == sent["fp32"], sent
    return f"ep {ep}: tokens sent fp32 {sent['fp32']} B, bf16 {sent['bf16']} B"


def check_deterministic(info: pd.DistInfo, group: Any) -> str:
    dev = info.device
    g = torch.Generator(device=dev).manual_seed(0)
    src = torch.randn(1 << 20, 64, device=dev, generator=g)
    idx = torch.randint(0, 512, (1 << 20,), device=dev, generator=g)

    def run() -> torch.Tensor:
        return torch.zeros(512, 64, device=dev).index_add_(0, idx, src)

    free = [run() for _ in range(3)]
    differs = any(not torch.equal(free[0], f) for f in free[1:])
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        det = [run() for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(det[0], d) for d in det[1:]), "deterministic index_add_ differs"
    return f"default index_add_ {'differs' if differs else 'agreed'} between runs; deterministic agrees"


CHECKS = {
    "wrappers": check_wrappers,
    "device": check_device,
    "rank0_wait": check_rank0_wait,
    "a2a_timing": check_a2a_timing,
    "bf16_dispatch": check_bf16_dispatch,
    "deterministic_index_add": check_deterministic,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--config", type=Path, required=True, help="a tiny DiffMoE config (configs/tiny.yaml)"
    )
    args = p.parse_args(argv)
    info = pd.init_distributed("nccl" if args.device == "cuda" else "gloo", TIMEOUT_S)
    group = dist.group.WORLD if info.world_size > 1 else None
    results: dict[str, dict[str, Any]] = {}
    for name, fn in CHECKS.items():
        try:
            extra = (args.config,) if fn is check_bf16_dispatch else ()
            results[name] = {"ok": True, "detail": fn(info, group, *extra)}
        except Exception as e:  # noqa: BLE001 - reported per check
            results[name] = {"ok": False, "detail": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        pd.barrier(group)
    ok = float(all(r["ok"] for r in results.values()))
    oks = pd.all_reduce_scalars([ok], group, info.device, "mean")
    if info.rank == 0:
        Path(args.out).write_text(json.dumps({"world_size": info.world_size, **results}, indent=1))
        for name, r in results.items():
            print(f"{'PASS' if r['ok'] else 'FAIL'} {name}: {r['detail']}", flush=True)
    pd.cleanup()
    return 0 if oks[0] == 1.0 else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
