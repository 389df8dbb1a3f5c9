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

import logging
import math
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
from diffmoe_dist.data.factory import build_dataset
from diffmoe_dist.models.capacity_schedule import capacity_at
from diffmoe_dist.parallel.distributed import (
    DistInfo,
    all_reduce,
    all_reduce_scalars,
    init_distributed,
    print0,
)
from diffmoe_dist.parallel.grad_reduce import (
    GradReducer,
    accumulate_kth,
    global_grad_norm,
    reduce_thresholds,
)
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
from diffmoe_dist.trainer.batch import check_data_matches_model, local_batch
from diffmoe_dist.trainer.ema import update_ema
from diffmoe_dist.trainer.metrics import MetricsLogger
from diffmoe_dist.trainer.nonfinite import NonFiniteError, NonFinitePolicy, check_finite_weights
from diffmoe_dist.trainer.optim import build_optimizer, lr_at, set_lr, zero_grad
from diffmoe_dist.trainer.run_dir import claim_run_dir, clear_preempted, mark_preempted, write_final
from diffmoe_dist.trainer.runlock import RunDirLock
from diffmoe_dist.trainer.throughput import Throughput
from diffmoe_dist.transport.objective import get_objective, model_out_channels

log = logging.getLogger(__name__)


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
        claim_run_dir(self.run_dir, self.run_lock, self.rank, self.ps.world_group)
        # 2. data: the dataset defines channels / size / classes; they must match the model
        self.dataset = build_dataset(cfg)
        check_data_matches_model(cfg, self.dataset)
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
        # samples/s, model TFLOP/s per rank and MFU between log steps (trainer/throughput.py)
        self.throughput = Throughput(cfg, self.world_size, self.device)
        self.step = self._last_saved = 0
        self.nonfinite = NonFinitePolicy(cfg.train, self.ps.world_group, self.device, self.rank)
        self._resume()
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        preemption.install()  # idempotent: train.py already installed it before the imports

    # ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Give the run directory back (the lock); the OS does it too when the process ends."""
        self.run_lock.release()

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

    def local_batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, ...]:
        """(x1, x0, t, y) of this rank's slice of micro-batch ``micro`` of step ``step`` (batch.py)."""
        return local_batch(
            self.cfg,
            self.dataset,
            self.objective,
            step,
            micro,
            self.rank,
            self.world_size,
            self.device,
        )

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
            accumulate_kth(self.model, kth)
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

    def _nonfinite_step(
        self, loss: float, grad_norm: float, applied: bool = False, agreed_bad: float | None = None
    ) -> bool:
        """train.nonfinite for the step being taken (nonfinite.py): True = skip its update."""
        return self.nonfinite.check(
            self.step + 1, loss, grad_norm, self._last_saved, applied, agreed_bad
        )

    @property
    def skipped_steps(self) -> int:
        return self.nonfinite.skipped_steps

    def _save_checked(self) -> Path:
        """save() once every model and EMA weight is finite on every rank (else NonFiniteError)."""
        check_finite_weights(
            (self.model, self.ema), self.ps.world_group, self.device, self.step, self._last_saved
        )
        return self.save()

    def grad_norm_tensor(self) -> torch.Tensor:
        """L2 norm of the full (unsharded) gradient, 0-dim float64 on the device (grad_reduce.py)."""
        return global_grad_norm(self.model, self.ps, self.device)

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
        bar = self._progress_bar(total)
        last: dict[str, float] = {}
        self.throughput.reset()
        # each step once, in order: drop what a crashed / stopped predecessor logged past our start
        self.metrics.truncate_after(self.step)
        if self.rank == 0:
            clear_preempted(self.run_dir)
        while self.step < total:
            out = self._train_step_logged()
            self.telemetry.add_step(out["step_time"], self.model)
            self.throughput.add_step(self.step - 1)
            if self.step % cfg.log_every == 0 or self.step == total:
                last = self._log_step(out)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            # A stop agreed on the last step is just the end of the run (no requeue needed).
            stop = self._stop_agreed() if self.step < total else preemption.NONE
            if stop != preemption.NONE:
                if bar is not None:
                    bar.close()
                return self._stop(stop)
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
            write_final(self.run_dir, result)
        self.metrics.close()
        return result

    def _progress_bar(self, total: int) -> Any:
        if self.rank != 0 or not self.cfg.run.progress or self.step >= total:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True)

    def _train_step_logged(self) -> dict[str, float]:
        """train_step; a non-finite stop is logged (metrics.jsonl marks the step) before it raises."""
        try:
            return self.train_step()
        except NonFiniteError as e:
            self.metrics.log(
                {"step": e.step, "loss": e.loss, "grad_norm": e.grad_norm, "nonfinite": True}
            )
            raise

    def _log_step(self, out: dict[str, float]) -> dict[str, float]:
        """One metrics.jsonl record: losses averaged over ranks, throughput since the last log
        step, MoE telemetry. Returns the averaged losses."""
        keys = ("loss", *self.objective.metric_keys, "cp_loss", "balance_loss")
        last = self._reduced({k: out[k] for k in keys})
        rec = {
            "step": self.step,
            **last,
            "lr": out["lr"],
            "grad_norm": out["grad_norm"],
            **self.throughput.record(),
            "world_size": self.world_size,
            "ep": self.ps.ep,
            "skipped_steps": self.skipped_steps,
            **self.moe_metrics(),
        }
        self.metrics.log(rec)
        return last

    def _stop(self, stop: int) -> dict[str, Any]:
        """A preemption (SIGUSR1 / SIGTERM: checkpoint + PREEMPTED for the launcher) or an interrupt
        (SIGINT: checkpoint only) agreed by every rank; train() returns normally."""
        self._save_checked()
        preempted = stop == preemption.PREEMPT
        if self.rank == 0 and preempted:  # the launcher requeues on this marker
            mark_preempted(self.run_dir, self.step)
            print0(f"preempted: checkpoint at step {self.step} written")
        elif not preempted:
            print0(
                f"interrupted (SIGINT): checkpoint at step {self.step} written; run the "
                "same command again to continue"
            )
        return {"step": self.step, "preempted": preempted, "interrupted": not preempted}
