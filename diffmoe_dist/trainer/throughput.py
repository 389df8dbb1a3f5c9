"""What metrics.jsonl reports as speed: samples/s, model TFLOP/s per rank and MFU between log steps.

FLOPs are the model's (models/flops.py: 3x the forward, per training sample), following
moe.capacity_schedule step by step; the peak is train.peak_tflops, else the bf16 peak of a known GPU
when training in bf16 (MFU is left out when neither is known).
"""

from __future__ import annotations

import time

import torch

from diffmoe_dist.config import Config
from diffmoe_dist.models.capacity_schedule import moe_at_step
from diffmoe_dist.models.flops import peak_bf16_flops, train_flops_per_sample


def peak_flops(cfg: Config, device: torch.device) -> float | None:
    """FLOP/s of one rank at 100% MFU: train.peak_tflops if set, else a known GPU's bf16 peak."""
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops * 1e12
    if device.type == "cuda" and cfg.train.precision == "bf16":
        return peak_bf16_flops(torch.cuda.get_device_name(device))
    return None


class Throughput:
    """Counts the global samples and model FLOPs of the steps since the last ``record()``."""

    def __init__(self, cfg: Config, world_size: int, device: torch.device):
        self.cfg, self.world_size = cfg, world_size
        self.flops_per_sample = train_flops_per_sample(cfg.model, cfg.moe)  # final capacity's
        self.peak_flops = peak_flops(cfg, device)
        self.reset()

    def reset(self) -> None:
        self.t0, self.samples, self.flops = time.perf_counter(), 0, 0.0

    def flops_at(self, step: int) -> float:
        """Model FLOPs of one training sample at 0-based step ``step`` (follows the schedule)."""
        if self.cfg.moe.capacity_schedule == "none":
            return self.flops_per_sample
        return train_flops_per_sample(self.cfg.model, moe_at_step(self.cfg.moe, step))

    def add_step(self, step: int) -> None:
        """0-based step ``step`` is done (one global batch)."""
        G = self.cfg.train.global_batch_size
        self.samples += G
        self.flops += G * self.flops_at(step)

    def record(self) -> dict[str, float]:
        """samples_per_s (global), tflops_per_rank and mfu (when the peak is known) since the last
        record; then starts counting again."""
        sps = self.samples / max(time.perf_counter() - self.t0, 1e-9)
        per_rank = sps * (self.flops / max(self.samples, 1)) / self.world_size
        out = {"samples_per_s": sps, "tflops_per_rank": per_rank / 1e12}
        if self.peak_flops:
            out["mfu"] = per_rank / self.peak_flops
        self.reset()
        return out
