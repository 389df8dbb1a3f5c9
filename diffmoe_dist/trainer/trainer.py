"""The training loop: one process or many (torchrun / SLURM / mpirun), native or DeepSpeed engine.

The math of a run does not depend on the number of ranks: step s uses the global batch
``global_batch_indices(seed, s)``; rank r takes the contiguous slice r of it; each sample's noise,
timestep, label dropout and flip come from (seed, step, position in the global batch); routing pools
are ``moe.pool_samples`` consecutive samples of that order. Loss = mean over the global batch, so
gradients are averaged with divide factor = world size (parallel/grad_reduce.py).

The objective (config ``objective``: flow | ddpm) is used only through transport/objective.py:
it maps the per-sample U[0, 1) time draw to its t, mixes data x1 and noise x0, and computes the
per-sample loss terms. Flow (transport/path.py): z_t = t * x1 + (1 - t) * x0, t = 0 noise, t = 1
data, target velocity x1 - x0. DDPM (transport/ddpm.py): integer t in 0..999, hybrid loss.

Engines: this class is the native engine; another engine (trainer/deepspeed_engine.py) overrides
only the engine's override points (setup_engine, zero_grad, accumulation_context, backward,
optimizer_step, checkpoint_optimizer) and inherits the batch, learning rate, thresholds, EMA,
logging, preemption, the non-finite policy and the checkpoint format.

Preemption: SIGUSR1 / SIGTERM set a flag; at the end of the current step all ranks agree (MAX
all-reduce), a complete checkpoint is written, rank 0 writes ``<run.dir>/PREEMPTED`` and train()
returns normally, so the launcher can requeue and the next run resumes where this one stopped.
SIGINT (Ctrl-C) saves the same way without the marker (diffmoe-train exits 130); see preemption.py.
The next start removes a stale PREEMPTED.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from diffmoe_dist.checkpoint import (
    CheckpointManager,
    precheck_resume,
    read_meta,
    refuse_old_deepspeed_dir,
)
from diffmoe_dist.config import Config, save_config
from diffmoe_dist.data import (
    FLIP_STREAM,
    LABEL_DROP_STREAM,
    TIME_STREAM,
    global_batch_indices,
    per_sample_normal,
    per_sample_uniform,
    rank_sample_ids,
    rank_slice,
)
from diffmoe_dist.data.factory import build_dataset
from diffmoe_dist.models.capacity_schedule import capacity_at, moe_at_step
from diffmoe_dist.models.flops import peak_bf16_flops, train_flops_per_sample
from diffmoe_dist.parallel.comm import COMM_CLOCK
from diffmoe_dist.parallel.distributed import (
    DistInfo,
    all_reduce,
    all_reduce_scalars,
    broadcast_object,
    init_distributed,
    print0,
)
from diffmoe_dist.parallel.grad_reduce import GradReducer, is_expert_param, reduce_thresholds
from diffmoe_dist.parallel.layout import Layout, layout_from_config
from diffmoe_dist.parallel.numerics import set_deterministic, set_tf32
from diffmoe_dist.parallel.parallelize import (
    ParallelState,
    apply_compile,
    build_copy,
    build_model,
    build_parallel_state,
    check_compile_supported,
)
from diffmoe_dist.telemetry import ExpertTelemetry
from diffmoe_dist.trainer import preemption
from diffmoe_dist.trainer.ema import update_ema
from diffmoe_dist.trainer.metrics import MetricsLogger
from diffmoe_dist.trainer.optim import build_optimizer, lr_at, set_lr, zero_grad
from diffmoe_dist.trainer.runlock import RunDirLock
from diffmoe_dist.transport.objective import get_objective, model_out_channels

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The run stopped on a non-finite loss / gradient norm / weights (train.nonfinite); the message
    names the step, the values and the last checkpoint, which is finite."""

    def __init__(self, step: int, loss: float, grad_norm: float, message: str):
        super().__init__(message)
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


class Trainer:
    """Read top to bottom: __init__ builds the run in numbered stages; train_step is one step."""

    def __init__(self, cfg: Config, dist_info: DistInfo | None = None):
        self.cfg = cfg
        # 1. distributed: rank, world, device; the layout is checked before any group is created
        self.dist = dist_info or init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
        self.rank, self.world_size, self.device = (
            self.dist.rank,
            self.dist.world_size,
            self.dist.device,
        )
        set_deterministic(cfg.train.deterministic)  # before the first CUDA matmul (cuBLAS config)
        set_tf32(cfg.train.tf32)
        self.layout: Layout = layout_from_config(cfg, self.world_size)  # the one check per start
        self.run_dir = Path(cfg.run.dir)
        refuse_old_deepspeed_dir(self.run_dir)  # before any group work
        precheck_resume(self.run_dir, cfg)  # another model / pool: refused before groups too
        self.ps: ParallelState = build_parallel_state(cfg, self.world_size, self.rank, self.layout)
        self.run_lock = RunDirLock(self.run_dir)  # rank 0 holds it from here to the end of train()
        self._check_run_dir()
        # 2. data: the dataset defines channels / size / classes; they must match the model
        self.dataset = build_dataset(cfg)
        self._check_data_matches_model()
        # 3. model and EMA (same init on every rank: seeded), then sharding + dispatchers
        #    (only this rank's experts are ever allocated; the EMA is built on the meta device and
        #    filled from the model: parallel/parallelize.py build_model / build_copy)
        torch.manual_seed(cfg.train.seed)
        self.objective = get_objective(cfg.objective)
        self.model = build_model(cfg, self.ps, model_out_channels(cfg)).to(self.device).train()
        self.model.checkpoint_blocks = cfg.train.activation_checkpointing == "blocks"
        self._pool, self._prefetched = None, {}  # data.prefetch: the next batch's future
        self.ema = build_copy(self.model, cfg, self.ps, self.device)
        if cfg.train.compile:  # after the EMA copy: only the trained model runs compiled
            check_compile_supported(self.device)  # a clear error now, not inside the first step
            apply_compile(self.model)
        # 4. the engine: optimizer, gradient reduction and the module the forward goes through
        #    (native: AdamW + GradReducer; DeepSpeed: its engine; the override point setup_engine)
        self.forward_module: torch.nn.Module = self.model
        self.setup_engine()
        # 5. checkpoints, metrics, resume
        self.ckpt = CheckpointManager(
            self.run_dir,
            cfg,
            self.rank,
            self.world_size,
            self.ps.world_group,
            cfg.train.keep_checkpoints,
        )
        self.ckpt.remove_stale_saves()  # ours to remove: this trainer holds the run
        self.metrics = MetricsLogger(
            self.run_dir, self.rank == 0, cfg.run.wandb, cfg.run.wandb_project, cfg.to_dict()
        )
        # per-layer expert telemetry, summed over ranks at log steps (diffmoe_dist/telemetry.py)
        self.telemetry = ExpertTelemetry(cfg.model.num_classes, self.world_size, self.rank)
        # model FLOPs per training sample and the per-rank peak, for tflops_per_rank / mfu
        self.flops_per_sample = train_flops_per_sample(cfg.model, cfg.moe)
        self.peak_flops = self._peak_flops()
        self.step = self._last_saved = 0
        self.skipped_steps = self._skips_in_row = 0  # train.nonfinite=skip_step bookkeeping
        self._resume()
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        preemption.install()  # idempotent: train.py already installed it before the imports

    # ------------------------------------------------------------------------------------------------
    def _peak_flops(self) -> float | None:
        """train.peak_tflops if set, else the bf16 peak of a known GPU when training in bf16."""
        if self.cfg.train.peak_tflops > 0:
            return self.cfg.train.peak_tflops * 1e12
        if self.device.type == "cuda" and self.cfg.train.precision == "bf16":
            return peak_bf16_flops(torch.cuda.get_device_name(self.device))
        return None

    def throughput(
        self, samples_per_s: float, flops_per_sample: float | None = None
    ) -> dict[str, float]:
        """Global samples/s -> model TFLOP/s per rank, and MFU when the peak is known.

        flops_per_sample: the mean over the measured steps (the capacity schedule changes it per
        step, see flops_at); None = self.flops_per_sample (the final capacity's)."""
        fps = self.flops_per_sample if flops_per_sample is None else flops_per_sample
        per_rank = samples_per_s * fps / self.world_size
        out = {"tflops_per_rank": per_rank / 1e12}
        if self.peak_flops:
            out["mfu"] = per_rank / self.peak_flops
        return out

    def _check_run_dir(self) -> None:
        """Rank 0 takes the run directory's lock (diffmoe_dist/trainer/runlock.py) before anything in it is
        written; every rank raises the same ValueError when it cannot (held elsewhere, read-only)."""
        problem: str | None = None
        if self.rank == 0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.run_lock.acquire()
                for d in (self.run_dir, self.run_dir / "checkpoints"):  # fail now, not at a save
                    d.mkdir(exist_ok=True)
                    probe = d / ".write-test"
                    probe.write_text("ok")
                    probe.unlink()
            except ValueError as e:
                problem = str(e)
            except OSError as e:
                problem = f"run.dir '{self.run_dir}' is not writable: {e}"
        problem = broadcast_object(problem, self.ps.world_group)
        if problem is not None:
            self.run_lock.release()
            raise ValueError(problem)

    def close(self) -> None:
        """Give the run directory back (the lock); the OS does it too when the process ends."""
        self.run_lock.release()

    def _check_data_matches_model(self) -> None:
        m, d = self.cfg.model, self.dataset
        for key, want, got in (
            ("in_channels", m.in_channels, d.channels),
            ("input_size", m.input_size, d.image_size),
            ("num_classes", m.num_classes, d.num_classes),
        ):
            if want != got:
                raise ValueError(
                    f"model.{key}={want} but the dataset ({self.cfg.data.name}) has {got}"
                )

    # ------------------------------------------------------------------------------------------------
    # the override points of an engine (trainer/deepspeed_engine.py overrides each of them)
    def setup_engine(self) -> None:
        """Stage 4: ``self.optimizer`` (AdamW) and the gradient reduction (GradReducer: DDP over the
        dense parameters + expert buckets over the edp group during backward, or flat); the forward
        goes through ``self.forward_module`` (the DDP wrapper under grad_reduce=overlap)."""
        cfg = self.cfg.train
        self.optimizer = build_optimizer(self.model, cfg)
        self.reducer = GradReducer(
            self.model, self.ps, cfg.grad_reduce, cfg.grad_reduce_dtype, cfg.grad_bucket_mb
        )
        self.forward_module = self.reducer.module

    def zero_grad(self) -> None:
        """Before the step's first micro-batch."""
        zero_grad(self.optimizer)  # apex FusedAdam's takes no set_to_none

    def accumulation_context(self, last: bool) -> AbstractContextManager[Any]:
        """Around forward + backward of one micro-batch: no gradient reduction unless ``last``."""
        return nullcontext() if last else self.reducer.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(
        self, losses: dict[str, torch.Tensor]
    ) -> tuple[dict[str, float], float, bool]:
        """Reduce, apply train.nonfinite, clip, step; returns (losses on the host, global grad
        norm, skipped). Gradients: dense averaged over the world, experts over the edp group."""
        # dense over world, experts over expert-data-parallel (waits for the overlapped buckets)
        self.reducer.finish()
        grad_norm_t = self.grad_norm_tensor()
        # The step's one blocking read: every loss, the gradient norm and the ranks' agreement on
        # finiteness (a MAX all-reduce on the device) come back to the host in one transfer.
        keys = list(losses)
        vals = torch.stack([losses[k].float() for k in keys] + [grad_norm_t.float()])
        bad = (~torch.isfinite(vals[[keys.index("loss"), -1]])).any().float().reshape(1)
        all_reduce(bad, self.ps.world_group, self.device, "max")
        *host, agreed_bad = torch.cat([vals, bad]).tolist()
        out = dict(zip(keys, host[:-1]))
        grad_norm = host[-1]
        if self._nonfinite_step(out["loss"], grad_norm, agreed_bad=agreed_bad):
            zero_grad(self.optimizer)
            return out, grad_norm, True
        clip = self.cfg.train.grad_clip
        if clip > 0:  # on the device: grads *= min(1, clip / (norm + 1e-6)), no read
            params = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm_t)
        self.optimizer.step()
        return out, grad_norm, False

    def checkpoint_optimizer(self) -> Any:
        """What the checkpoint stores as optimizer state: a torch optimizer keyed by the model's
        parameters, or an object with ``checkpoint_state`` / ``restore_checkpoint_state``
        (checkpoint/state.py) that presents the state as full per-parameter tensors."""
        return self.optimizer

    # ------------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        # every checkpoint unreadable: refuse (ValueError naming them) unless train.allow_restart
        path = self.ckpt.resume_point(self.cfg.train.allow_restart)
        if path is None:
            return
        saved_engine = read_meta(path).get("config", {}).get("engine", "native")
        if self.rank == 0 and saved_engine != self.cfg.engine:
            msg = (
                f"engine switch: {path} was written by engine={saved_engine}; resuming it with "
                f"engine={self.cfg.engine} (weights, EMA, thresholds and optimizer state carry over)"
            )
            log.warning(msg)
            print0(msg)
        meta = self.ckpt.load(path, self.model, self.ema, self.checkpoint_optimizer())
        self.step = self._last_saved = int(meta["step"])
        self.metrics.truncate_after(self.step)
        old = meta["layout"]
        print0(
            f"resumed from {path} at step {self.step} (saved at world {old['world_size']}, "
            f"ep {old['ep']}; now world {self.world_size}, ep {self.ps.ep})"
        )

    # ------------------------------------------------------------------------------------------------
    def apply_capacity_schedule(self, step: int) -> None:
        """Set the training capacity of 0-based step ``step`` (moe.capacity_schedule; a pure
        function of the step, so a resumed run continues the schedule exactly)."""
        if self.cfg.moe.capacity_schedule != "none":
            self.model.set_train_capacity(capacity_at(self.cfg.moe, step))

    def flops_at(self, step: int) -> float:
        """Model FLOPs of one training sample at 0-based step ``step`` (follows the schedule)."""
        if self.cfg.moe.capacity_schedule == "none":
            return self.flops_per_sample
        return train_flops_per_sample(self.cfg.model, moe_at_step(self.cfg.moe, step))

    def local_batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, ...]:
        """This rank's slice of micro-batch ``micro`` of the global batch of ``step``, with its
        per-sample draws. With train.grad_accum_steps = A the global batch (fixed order) is cut into
        A consecutive parts of G / A samples, each laid out over the ranks as a whole batch would be,
        so pools (consecutive samples) are the same as without accumulation.
        """
        cfg, G = self.cfg, self.cfg.train.global_batch_size
        A = cfg.train.grad_accum_steps
        part = G // A
        idx = rank_slice(
            global_batch_indices(len(self.dataset), G, cfg.train.seed, step)[
                micro * part : (micro + 1) * part
            ],
            self.rank,
            self.world_size,
        )
        # positions in the global batch
        ids = micro * part + rank_sample_ids(part, self.rank, self.world_size)
        seed = cfg.train.seed
        flip = (per_sample_uniform(seed, step, ids, FLIP_STREAM) < 0.5) & cfg.data.hflip
        x1, y = self.dataset.get_batch(idx, flip)
        x0 = per_sample_normal(seed, step, ids, x1.shape[1:])
        t = self.objective.time_from_uniform(per_sample_uniform(seed, step, ids, TIME_STREAM))
        drop = per_sample_uniform(seed, step, ids, LABEL_DROP_STREAM) < cfg.model.class_dropout_prob
        y = torch.where(drop, torch.full_like(y, cfg.model.num_classes), y)  # null class for CFG
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > cfg.model.num_classes):  # host tensor
            raise ValueError(
                f"class labels must be in [0, {cfg.model.num_classes}] (model.num_classes = null "
                f"class), got min {int(y.min())}, max {int(y.max())} from the dataset"
            )
        if self.device.type == "cuda":  # pinned host memory: the copy does not block the host
            return tuple(
                v.pin_memory().to(self.device, non_blocking=True) for v in (x1.float(), x0, t, y)
            )
        return tuple(v.to(self.device) for v in (x1.float(), x0, t, y))

    def _next_batch(self, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        """local_batch(step, micro), taken from the background thread when it was prefetched; then
        the following micro-batch (or step) is submitted, so reading the shards and drawing the
        per-sample noise (a pure function of (seed, step, global index)) overlap this step."""
        fut = self._prefetched.pop((step, micro), None) if self._prefetched else None
        batch = fut.result() if fut is not None else self.local_batch(step, micro)
        if self.cfg.data.prefetch:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch")
            A = self.cfg.train.grad_accum_steps
            nxt = (step, micro + 1) if micro + 1 < A else (step + 1, 0)
            self._prefetched = {nxt: self._pool.submit(self.local_batch, *nxt)}
        return batch

    def forward_loss(
        self, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        obj = self.objective
        zt = obj.noisy(x1, x0, t)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16"
        ):
            out = self.forward_module(
                zt, obj.model_time(t), y
            )  # DDP wrapper under grad_reduce=overlap
        # local counters only, no collective; telemetry buckets use the flow convention
        self.telemetry.add(self.model.moe_stats(), obj.flow_time(t), y)
        terms = {k: v.mean() for k, v in obj.losses(out.float(), x1, x0, zt, t).items()}
        aux = self.model.aux_losses()
        moe = self.cfg.moe
        loss = (
            terms[obj.loss_key]
            + moe.cp_loss_weight * aux["cp_loss"]
            + moe.balance_loss_weight * aux["balance_loss"]
        )
        return {"loss": loss, **terms, **aux}

    def train_step(self) -> dict[str, float]:
        step, cfg = self.step, self.cfg.train
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        set_lr(self.optimizer, lr)
        self.apply_capacity_schedule(step)
        self.zero_grad()
        A = cfg.grad_accum_steps
        sums: dict[str, torch.Tensor] = {}
        kth: list[list] = []  # per MoE layer: [kth_sum, kth_count] summed over micro-batches
        for micro in range(A):
            x1, x0, t, y = self._next_batch(step, micro)
            # all but the last micro-batch accumulate locally; one reduction per step
            with self.accumulation_context(last=micro == A - 1):
                losses = self.forward_loss(x1, x0, t, y)
                self.backward(losses["loss"] / A if A > 1 else losses["loss"])
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / A
            self._accumulate_kth(kth)
        losses = sums
        out, grad_norm, skipped = self.optimizer_step(losses)
        if skipped:  # train.nonfinite=skip_step: no update, EMA, thresholds
            self.step += 1
            out.update(lr=lr, grad_norm=grad_norm, step_time=time.perf_counter() - t0)
            return {**out, "skipped": 1.0}
        # post-step hooks, whatever the engine: kth statistics over the world, then the EMA
        reduce_thresholds(self.model, self.ps)
        update_ema(self.ema, self.model, cfg.ema_decay)
        self.step += 1
        out.update(lr=lr, grad_norm=grad_norm, step_time=time.perf_counter() - t0)
        return out

    def _accumulate_kth(self, acc: list[list]) -> None:
        """Sum the threshold statistics of every micro-batch into the layers' last stats, so
        reduce_thresholds averages over all pools of the step (as without accumulation)."""
        layers = [m for m in self.model.moe_layers() if m.stats.kth_sum is not None]
        if not acc:
            acc.extend([m.stats.kth_sum.clone(), m.stats.kth_count] for m in layers)
            return
        for a, m in zip(acc, layers):
            a[0] += m.stats.kth_sum
            a[1] += m.stats.kth_count
            m.stats.kth_sum, m.stats.kth_count = a[0].clone(), a[1]

    def _nonfinite_step(
        self, loss: float, grad_norm: float, applied: bool = False, agreed_bad: float | None = None
    ) -> bool:
        """Apply train.nonfinite to this step's (rank-local) loss and (global) gradient norm.

        Every rank agrees (MAX all-reduce of a flag), so all of them skip or all raise. Returns True
        when the step's update must be skipped; raises NonFiniteError to stop. ``applied``: the
        engine has already stepped (DeepSpeed), so skipping is impossible and the run stops.
        """
        if agreed_bad is None:  # (the native step agrees on the device and passes agreed_bad)
            bad = 0.0 if math.isfinite(loss) and math.isfinite(grad_norm) else 1.0
            agreed_bad = all_reduce_scalars([bad], self.ps.world_group, self.device, "max")[0]
        if not agreed_bad:
            self._skips_in_row = 0
            return False
        step, policy = self.step + 1, self.cfg.train.nonfinite
        what = f"non-finite loss {loss} (grad norm {grad_norm}) at step {step}"
        last = f"step-{self._last_saved:08d}" if self._last_saved else "none yet"
        if policy == "stop" or applied:
            raise NonFiniteError(
                step,
                loss,
                grad_norm,
                f"{what}; train.nonfinite={policy}: stopped, nothing saved after the last "
                f"checkpoint ({last}); lower train.lr (or set train.grad_clip) and rerun to resume",
            )
        self._skips_in_row += 1
        self.skipped_steps += 1
        limit = self.cfg.train.nonfinite_max_skips
        if self._skips_in_row >= limit:
            raise NonFiniteError(
                step,
                loss,
                grad_norm,
                f"{what}: {self._skips_in_row} steps in a row skipped "
                f"(train.nonfinite_max_skips={limit}); stopped, last checkpoint {last}",
            )
        if self.rank == 0:
            log.warning("%s: update skipped (train.nonfinite=skip_step)", what)
        return True

    @torch.no_grad()
    def _check_finite_weights(self) -> None:
        """NonFiniteError unless every model and EMA weight (buffers included) is finite on every
        rank: a checkpoint never holds non-finite weights, whatever the engine."""
        bad = torch.zeros((), device=self.device)
        for module in (self.model, self.ema):
            for t in (*module.parameters(), *module.buffers()):
                if t.is_floating_point():
                    bad += (~torch.isfinite(t)).sum()
        all_reduce(bad, self.ps.world_group, self.device)
        if bad.item():
            last = f"step-{self._last_saved:08d}" if self._last_saved else "none yet"
            raise NonFiniteError(
                self.step,
                math.nan,
                math.nan,
                f"{int(bad.item())} non-finite weights at step {self.step}: not saved; the last "
                f"checkpoint ({last}) is the last finite one",
            )

    def _save_checked(self) -> Path:
        self._check_finite_weights()
        return self.save()

    def global_grad_norm(self) -> float:
        """L2 norm of the full (unsharded) gradient: experts' squares summed over the ep group."""
        return float(self.grad_norm_tensor())

    def grad_norm_tensor(self) -> torch.Tensor:
        """global_grad_norm as a 0-dim float64 tensor on the device (foreach norms, no host read)."""
        dense, expert = [], []
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                (expert if is_expert_param(name, p) else dense).append(p.grad.detach())
        zero = torch.zeros((), dtype=torch.float64, device=self.device)

        def sq(gs: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(torch._foreach_norm(gs)).double().square().sum() if gs else zero

        d, e = sq(dense), sq(expert).clone()
        if self.ps.ep_group is not None and self.ps.ep > 1:
            with COMM_CLOCK.blocking():
                all_reduce(e, self.ps.ep_group, self.device)
        return (d + e).sqrt()

    # ------------------------------------------------------------------------------------------------
    def _reduced(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of per-rank values (losses are per-rank means of equal-size slices)."""
        keys = sorted(values)
        means = all_reduce_scalars([values[k] for k in keys], self.ps.world_group, self.device)
        return dict(zip(keys, means))

    def _stop_agreed(self) -> int:
        """preemption.NONE / INTERRUPT (SIGINT) / PREEMPT (SIGUSR1, SIGTERM), the MAX over ranks."""
        kind = float(preemption.kind())
        return int(all_reduce_scalars([kind], self.ps.world_group, self.device, "max")[0])

    def moe_metrics(self) -> dict[str, Any]:
        """MoE statistics since the last log step, summed over ranks (telemetry.py: one all-reduce),
        so the numbers are those of the global batches whatever the layout."""
        out = self.telemetry.log_metrics(self.ps.world_group, self.device, self.model)
        if "tokens_per_expert" in out:
            out["pool_samples"] = self.cfg.moe.pool_samples
        return out

    def save(self) -> Path:
        path = self.ckpt.save(
            self.step,
            self.model,
            self.ema,
            self.checkpoint_optimizer(),
            extra={"data_position": self.step},
        )
        self._last_saved = self.step
        return path

    def train(self) -> dict[str, Any]:
        """Run to train.steps (or a preemption stop); the run directory's lock is given back after."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict[str, Any]:
        cfg = self.cfg.train
        total = cfg.steps
        bar = None
        if self.rank == 0 and self.cfg.run.progress and self.step < total:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True)
        last: dict[str, float] = {}
        t_log, samples, flops = time.perf_counter(), 0, 0.0
        # each step once, in order: drop what a crashed / stopped predecessor logged past our start
        self.metrics.truncate_after(self.step)
        if self.rank == 0:  # a predecessor's preemption marker has been acted on: it is stale now
            (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
        while self.step < total:
            try:
                out = self.train_step()
            except NonFiniteError as e:
                self.metrics.log(
                    {"step": e.step, "loss": e.loss, "grad_norm": e.grad_norm, "nonfinite": True}
                )
                raise
            self.telemetry.add_step(out["step_time"], self.model)
            samples += cfg.global_batch_size
            flops += cfg.global_batch_size * self.flops_at(self.step - 1)
            if self.step % cfg.log_every == 0 or self.step == total:
                last = self._reduced(
                    {
                        k: out[k]
                        for k in ("loss", *self.objective.metric_keys, "cp_loss", "balance_loss")
                    }
                )
                elapsed = time.perf_counter() - t_log
                sps = samples / max(elapsed, 1e-9)
                rec = {
                    "step": self.step,
                    **last,
                    "lr": out["lr"],
                    "grad_norm": out["grad_norm"],
                    "samples_per_s": sps,
                    **self.throughput(sps, flops / samples),
                    "world_size": self.world_size,
                    "ep": self.ps.ep,
                    "skipped_steps": self.skipped_steps,
                    **self.moe_metrics(),
                }
                self.metrics.log(rec)
                t_log, samples, flops = time.perf_counter(), 0, 0.0
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            # A stop agreed on the last step is just the end of the run (no requeue needed).
            stop = self._stop_agreed() if self.step < total else preemption.NONE
            if stop != preemption.NONE:
                self._save_checked()
                preempted = stop == preemption.PREEMPT
                if self.rank == 0 and preempted:  # the launcher requeues on this marker
                    (self.run_dir / "PREEMPTED").write_text(json.dumps({"step": self.step}))
                    print0(f"preempted: checkpoint at step {self.step} written")
                elif not preempted:
                    print0(
                        f"interrupted (SIGINT): checkpoint at step {self.step} written; run the "
                        "same command again to continue"
                    )
                if bar is not None:
                    bar.close()
                return {"step": self.step, "preempted": preempted, "interrupted": not preempted}
            if self.step % cfg.ckpt_every == 0 and self.step < total:
                self._save_checked()
        if bar is not None:
            bar.close()
        if self._last_saved != self.step and cfg.save_final:
            self._save_checked()
        result = {
            "step": self.step,
            "preempted": False,
            **{k: v for k, v in last.items() if math.isfinite(v)},
        }
        if self.rank == 0:
            tmp = self.run_dir / "final.json.tmp"
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, self.run_dir / "final.json")
        self.metrics.close()
        return result
