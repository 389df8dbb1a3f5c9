"""Benchmark of the whole training step: DiffMoE against Dense-DiT of the same activated FLOPs.

One step = what ``Trainer.train_step`` does (batch from real latent shards, forward, loss, backward,
gradient reduction, optimizer, threshold all-reduce, EMA), on 1 process or on N gloo / nccl ranks
with ep = N for the MoE model (data parallel for the dense one). Every case of a rank count runs in
the same processes and each repeat steps every case once in a fixed order, so load changes hit
them alike; ratio_vs_dense is the median of the per-repeat paired ratios.

What each number is:
  ms_median, ms_spread   wall time of train_step on rank 0 (median, interquartile range), after
                         ``warmup`` untimed steps; the step ends with collectives, so ranks agree.
  samples_per_s          global samples per step / step time.
  tflops_per_rank, mfu_vs_measured_peak
                         model FLOPs (diffmoe_dist/models/flops.py: train_flops_per_sample) per rank per
                         second, over the matmul peak measured in the same run on the same device
                         and dtype (best n x n matmul before the timed steps and in every repeat,
                         each rank at the same time).
  exposed_comm_frac      time this rank waited on communication that nothing overlapped, over the
                         step: the dispatcher's all-to-alls and score gathers (forward and backward,
                         all synchronous), the flat gradient reduction, the tail of the overlapped
                         reduction (from the last gradient backward produced to the end of the
                         reduction), the threshold and gradient-norm all-reduces (COMM_CLOCK in
                         parallel/comm.py). Mean over ranks.
  host_syncs_per_step    counted on one extra, untimed step under a TorchDispatchMode
                         (``SyncCounter``): every aten op whose result the host must wait for on a
                         device (``_local_scalar_dense`` = .item() / float() / bool(), nonzero,
                         unique, masked_select, repeat_interleave without output_size, a copy from
                         the device to the host) plus every Tensor.tolist() (and, on CPU, every
                         Tensor.cpu(), which dispatches nothing there), for tensors on the
                         benchmark's device. On CPU every tensor
                         is "on the device", so batch preparation (host tensors in a GPU run too:
                         sample ids, per-sample draws) is excluded by pausing the counter in
                         ``local_batch``. Max over ranks; ``sync_ops`` names them.
  peak_mem_mb            CUDA: max_memory_allocated during the instrumented step above what was
                         allocated before it. CPU: torch.profiler(profile_memory=True) over the
                         same step, the running sum of every op's self allocation (op granularity,
                         allocator caching not counted), as moe_bench does.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import socket
import statistics
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffmoe_dist.bench.common import check_cases
from diffmoe_dist.bench.moe_bench import iqr
from diffmoe_dist.config import Config, from_dict, merge_dicts, parse_overrides

REQUIRED_KEYS = (
    "model",
    "ranks",
    "ep",
    "images_per_rank",
    "ms_median",
    "ms_spread",
    "samples_per_s",
    "ratio_vs_dense",
    "exposed_comm_frac",
    "host_syncs_per_step",
    "mfu_vs_measured_peak",
    "peak_mem_mb",
)
OPTIONAL_KEYS = (
    "variant",
    "overrides",
    "tflops_per_rank",
    "exposed_comm_ms",
    "sync_ops",
    "per_rank",
)

# aten ops that make the host wait for a device result (their output shape or value is data).
SYNC_OPS = {
    "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "aten::nonzero",
    "aten::nonzero_static",  # listed for completeness: static size, no sync on CUDA (not counted)
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
}
_NOT_SYNC = {"aten::nonzero_static"}


class SyncCounter(TorchDispatchMode):
    """Count the host syncs of the ops run inside (see the module docstring); ``paused()`` skips."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.counts: Counter[str] = Counter()
        self.by_section: Counter[str] = Counter()  # syncs per section() name ("step" outside)
        self._section = "step"
        self._paused = 0
        self._orig_tolist = None

    def _on_device(self, args: Any) -> bool:
        for a in args:
            if isinstance(a, torch.Tensor) and a.device.type == self.device_type:
                return True
            if isinstance(a, (list, tuple)) and self._on_device(a):
                return True
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if not self._paused:
            name = func._schema.name
            sync = name in SYNC_OPS and name not in _NOT_SYNC
            if name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
                sync = len(args) == 1 or isinstance(args[1], torch.Tensor)
            if sync and self._on_device(args):
                self._count(name.removeprefix("aten::"))
            elif (
                name in ("aten::_to_copy", "aten::copy_")
                and self.device_type != "cpu"
                and self._to_host(name, args, kwargs)
            ):
                self._count("to_host")
        return func(*args, **kwargs)

    def _to_host(self, name: str, args: Any, kwargs: dict) -> bool:
        """A device -> host copy (a sync on CUDA): _to_copy(dev, device=cpu) or cpu.copy_(dev)."""
        if name == "aten::_to_copy":
            dev = kwargs.get("device")
            return args[0].device.type == self.device_type and dev is not None and dev.type == "cpu"
        return args[0].device.type == "cpu" and args[1].device.type == self.device_type

    def __enter__(self):  # noqa: ANN204
        counter = self
        orig_tolist, orig_cpu = torch.Tensor.tolist, torch.Tensor.cpu
        self._orig = (orig_tolist, orig_cpu)

        me = threading.get_ident()  # count this thread only (not the batch-prefetch thread)

        def tolist(t: torch.Tensor):  # noqa: ANN202 - Tensor.tolist's own return type
            if threading.get_ident() != me:
                return orig_tolist(t)
            if not counter._paused and t.device.type == counter.device_type:
                counter._count("tolist")
            return orig_tolist(t)

        def cpu(t: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            # On a CPU benchmark .cpu() dispatches nothing; in a GPU run it is a device -> host copy.
            if not counter._paused and counter.device_type == "cpu" and threading.get_ident() == me:
                counter._count("cpu")
            return orig_cpu(t, *a, **k)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        torch.Tensor.cpu = cpu  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc):  # noqa: ANN002, ANN204
        torch.Tensor.tolist, torch.Tensor.cpu = self._orig  # type: ignore[method-assign]
        return super().__exit__(*exc)

    def _count(self, op: str) -> None:
        self.counts[op] += 1
        self.by_section[self._section] += 1

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Attribute the syncs inside to ``name`` (by_section)."""
        prev, self._section = self._section, name
        try:
            yield
        finally:
            self._section = prev

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ----------------------------------------------------------------------------------------------------
@dataclass
class StepSpec:
    """What one rank count runs: every (variant, model) pair, the same sizes for all."""

    models: list[str]
    ranks: int
    images_per_rank: int
    variants: dict[str, list[str]]  # name -> config overrides (key=value), applied to every model
    overrides: list[str] = field(default_factory=list)  # applied to every case first
    device: str = "cpu"
    dtype: str = "fp32"
    warmup: int = 2
    repeats: int = 5
    threads: int = 0  # torch threads per rank; 0 = cpu_count // ranks (at least 1)
    data_dir: str = ""
    work_dir: str = ""


def is_dense(model: str) -> bool:
    return model.startswith("Dense-")


def step_config(spec: StepSpec, model: str, variant: str, rank_dir: str) -> Config:
    """The config of one case: a registry model at 32x32x4 latents (or as overridden), global batch
    images_per_rank x ranks, one pool per rank (moe.pool_samples = images_per_rank), ep = ranks for
    an MoE model, nothing logged or checkpointed inside the timed steps."""
    data: dict[str, Any] = {
        "model": {"name": model, "input_size": 32, "in_channels": 4, "num_classes": 1000},
        "moe": {"pool_samples": spec.images_per_rank},
        "train": {
            "global_batch_size": spec.images_per_rank * spec.ranks,
            "steps": 10**9,
            "log_every": 10**9,
            "ckpt_every": 10**9,
            "precision": spec.dtype,
        },
        "data": {"name": "latents", "path": spec.data_dir},
        "parallel": {
            "ep": 1 if is_dense(model) else spec.ranks,
            "backend": "nccl" if spec.device == "cuda" else "gloo",
        },
        "run": {"dir": rank_dir, "progress": False},
    }
    data = merge_dicts(data, parse_overrides(spec.overrides + spec.variants[variant]))
    return from_dict(data).validate()


def write_latents(path: str, count: int, cfg: Config) -> None:
    """Random latents in the real shard format, one shard (data/synthetic.py, seed 0)."""
    from diffmoe_dist.data.synthetic import write_synthetic_latents

    m = cfg.model
    shape = (m.in_channels, m.input_size, m.input_size)
    write_synthetic_latents(path, count, shape, m.num_classes, shard_size=max(count, 1))


def measured_peak_flops(device: str, dtype: str, n: int = 2048, reps: int = 3) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on ``device`` (the peak MFU is against)."""
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(4 if device == "cuda" else 1):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / (4 if device == "cuda" else 1))
    return 2 * n**3 / best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _comm_snapshot(trainer: Any) -> float:
    from diffmoe_dist.parallel.comm import COMM_CLOCK

    disp = sum(
        float(getattr(getattr(m, "dispatcher", None), "comm_time_s", 0.0))
        for m in trainer.model.modules()
    )
    return COMM_CLOCK.blocked_s + disp


def _instrumented_step(trainer: Any, device: str) -> tuple[dict[str, int], float]:
    """One untimed step: host syncs by op, and peak memory (MB) above what was live before it."""
    counter = SyncCounter(device)
    orig = trainer.local_batch

    def local_batch(*a: Any, **k: Any) -> Any:
        with counter.paused():  # host-side batch preparation (see the module docstring)
            return orig(*a, **k)

    trainer.local_batch = local_batch
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with counter:
                trainer.train_step()
            torch.cuda.synchronize()
            return dict(counter.counts), (torch.cuda.max_memory_allocated() - base) / 2**20
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with counter:
                trainer.train_step()
        cur = peak = 0
        for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
            cur += ev.self_cpu_memory_usage
            peak = max(peak, cur)
        return dict(counter.counts), peak / 2**20
    finally:
        del trainer.local_batch  # back to the class method


def run_rank(rank: int, spec: StepSpec) -> dict[str, Any]:
    """Build every case on this rank, time them interleaved, instrument one more step of each."""
    from diffmoe_dist.models.flops import train_flops_per_sample
    from diffmoe_dist.parallel.distributed import DistInfo, barrier
    from diffmoe_dist.trainer.trainer import Trainer

    threads = spec.threads or max(1, (os.cpu_count() or 1) // spec.ranks)
    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if spec.device == "cuda" else torch.device("cpu")
    if spec.device == "cuda":
        torch.cuda.set_device(device)
    backend = ("nccl" if spec.device == "cuda" else "gloo") if spec.ranks > 1 else ""
    info = DistInfo(rank, spec.ranks, rank, device, backend)
    cases = {}
    for variant in spec.variants:
        for model in spec.models:
            run_dir = Path(spec.work_dir) / f"{variant}-{model}"
            cfg = step_config(spec, model, variant, str(run_dir))
            with contextlib.redirect_stdout(io.StringIO()):
                tr = Trainer(cfg, info)
            cases[(variant, model)] = (tr, cfg)
    if spec.ranks > 1:
        barrier(torch.distributed.group.WORLD)
    peak = measured_peak_flops(spec.device, spec.dtype)
    for tr, _ in cases.values():
        for _ in range(spec.warmup):
            tr.train_step()
    ms: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
    exposed: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
    for _ in range(spec.repeats):
        # the peak again each repeat, keeping the best: one measurement under a passing load spike
        # would understate it (and overstate MFU)
        peak = max(peak, measured_peak_flops(spec.device, spec.dtype))
        for key, (tr, _) in cases.items():
            c0 = _comm_snapshot(tr)
            _sync(spec.device)
            t0 = time.perf_counter()
            tr.train_step()
            _sync(spec.device)
            ms[key].append((time.perf_counter() - t0) * 1e3)
            exposed[key].append((_comm_snapshot(tr) - c0) * 1e3)
    out: dict[str, Any] = {"peak_flops": peak, "threads": threads, "cases": {}}
    for key, (tr, cfg) in cases.items():
        syncs, mem = _instrumented_step(tr, spec.device)
        out["cases"][key] = {
            "ms": ms[key],
            "exposed_ms": exposed[key],
            "syncs": syncs,
            "peak_mem_mb": mem,
            "flops_per_sample": train_flops_per_sample(cfg.model, cfg.moe),
            "ep": tr.ps.ep,
        }
    return out


# ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, spec: StepSpec, port: int, results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = str(spec.threads or max(1, (os.cpu_count() or 1) // spec.ranks))
    try:
        if spec.ranks > 1:
            torch.distributed.init_process_group(
                "nccl" if spec.device == "cuda" else "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=spec.ranks,
                timeout=timedelta(seconds=600),
            )
        buf = io.BytesIO()
        torch.save(run_rank(rank, spec), buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(spec: StepSpec, timeout_s: float = 3600.0) -> list[dict[str, Any]]:
    """run_rank on ``spec.ranks`` spawned processes (in this process when ranks == 1)."""
    if spec.ranks == 1:
        # In this process: give back the caller's intra-op thread count afterwards (run_rank sets
        # its own); a test suite that benchmarks in-process must not change later tests' kernels.
        threads = torch.get_num_threads()
        try:
            return [run_rank(0, spec)]
        finally:
            torch.set_num_threads(threads)
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, spec, port, results), daemon=True)
        for r in range(spec.ranks)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < spec.ranks:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench_step: ranks {sorted(got)} finished within {timeout_s}s")
            try:
                r, ok, v = results.get(timeout=1.0)
                got[r] = (ok, v)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
                if dead and results.empty():
                    time.sleep(1.0)
                    if results.empty():
                        raise RuntimeError(f"bench_step: rank(s) {dead} died") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [v for ok, v in got.values() if not ok]
    if errors:
        raise RuntimeError("bench_step: a rank failed:\n" + "\n".join(errors))
    return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(spec.ranks)]


def bench_ranks(spec: StepSpec) -> list[dict[str, Any]]:
    """Run one rank count (latent shards written to a temporary directory) -> JSON cases."""
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        first = step_config(
            StepSpec(**{**spec.__dict__, "data_dir": "unused"}),
            spec.models[0],
            next(iter(spec.variants)),
            tmp,
        )
        spec = StepSpec(**{**spec.__dict__, "data_dir": f"{tmp}/latents", "work_dir": tmp})
        write_latents(spec.data_dir, max(spec.images_per_rank * spec.ranks, 8), first)
        per_rank = run_ranks(spec)
    return summarize(spec, per_rank)


def summarize(spec: StepSpec, per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r0 = per_rank[0]
    cases = []
    for variant, ovr in spec.variants.items():
        dense_key = next(((variant, m) for m in spec.models if is_dense(m)), None)
        for model in spec.models:
            key = (variant, model)
            c = r0["cases"][key]
            ms = c["ms"]
            med = statistics.median(ms)
            samples = spec.images_per_rank * spec.ranks
            fracs = [  # each rank's exposed time over its own step time
                statistics.median(
                    e / t for e, t in zip(pr["cases"][key]["exposed_ms"], pr["cases"][key]["ms"])
                )
                for pr in per_rank
            ]
            syncs = max(per_rank, key=lambda pr: sum(pr["cases"][key]["syncs"].values()))
            sync_ops = syncs["cases"][key]["syncs"]
            tflops = c["flops_per_sample"] * spec.images_per_rank / (med * 1e-3)
            ratio = None
            if dense_key is not None:
                dense = r0["cases"][dense_key]["ms"]
                ratio = statistics.median(a / d for a, d in zip(ms, dense))
            cases.append(
                {
                    "model": model,
                    "variant": variant,
                    "overrides": spec.overrides + ovr,
                    "ranks": spec.ranks,
                    "ep": c["ep"],
                    "images_per_rank": spec.images_per_rank,
                    "ms_median": med,
                    "ms_spread": iqr(ms),
                    "samples_per_s": samples / (med * 1e-3),
                    "ratio_vs_dense": ratio,
                    "exposed_comm_frac": statistics.mean(fracs),
                    "exposed_comm_ms": statistics.median(c["exposed_ms"]),
                    "host_syncs_per_step": sum(sync_ops.values()),
                    "sync_ops": sync_ops,
                    "tflops_per_rank": tflops / 1e12,
                    "mfu_vs_measured_peak": tflops / r0["peak_flops"],
                    "peak_mem_mb": round(
                        max(pr["cases"][key]["peak_mem_mb"] for pr in per_rank), 2
                    ),
                    # every rank's step and exposed time per repeat (ms): the rank skew the
                    # planner check calibrates on (planner/check.py)
                    "per_rank": [
                        {
                            "ms": [round(v, 3) for v in pr["cases"][key]["ms"]],
                            "exposed_ms": [round(v, 3) for v in pr["cases"][key]["exposed_ms"]],
                        }
                        for pr in per_rank
                    ],
                }
            )
    return cases


def validate_result(result: dict) -> None:
    """Raise ValueError unless ``result`` has the JSON shape of issue 15 (plus the optional keys)."""
    for i, c in enumerate(check_cases(result, REQUIRED_KEYS, OPTIONAL_KEYS)):
        for k in ("ms_median", "ms_spread", "samples_per_s", "peak_mem_mb", "mfu_vs_measured_peak"):
            if not isinstance(c[k], (int, float)) or c[k] < 0:
                raise ValueError(f"case {i}: {k}={c[k]!r} is not a non-negative number")
        if not 0.0 <= c["exposed_comm_frac"] <= 1.0:
            raise ValueError(f"case {i}: exposed_comm_frac={c['exposed_comm_frac']} not in [0, 1]")
        if not isinstance(c["host_syncs_per_step"], int) or c["host_syncs_per_step"] < 0:
            raise ValueError(f"case {i}: host_syncs_per_step={c['host_syncs_per_step']!r}")
