"""Numerics switches of a run: TF32 for fp32 matmuls, deterministic kernels, sampling precision.

- ``train.tf32`` / ``sample.precision``: on an H100 an fp32 matmul without TF32 runs at a small
  fraction of the bf16 peak. TF32 (10-bit mantissa inputs, fp32 accumulation) is what PyTorch calls
  ``set_float32_matmul_precision("high")``; it changes fp32 results at about 1e-3 relative, so it is a
  setting, stored with the run's config. No effect on CPU.
- ``train.deterministic``: ``torch.use_deterministic_algorithms`` (index_add_ and the backward of
  index_select, which the MoE layer uses, switch to deterministic CUDA kernels) and
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS otherwise picks reduction orders per stream). Ops
  without a deterministic CUDA kernel warn instead of failing (``warn_only``). On CPU the kernels
  this project uses are deterministic already. docs/gpu.md states what still differs on a GPU.
- ``sample.precision``: auto (bf16 on CUDA, fp32 on CPU) | bf16 (the model under bf16 autocast; the
  sampler integrates in fp32) | tf32 (fp32 with TF32 matmuls) | fp32 (exact fp32, TF32 off).
"""

from __future__ import annotations

import contextlib
import os

import torch

SAMPLE_PRECISIONS = ("auto", "bf16", "tf32", "fp32")


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 for fp32 matmuls and convolutions (CUDA only; harmless elsewhere)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels for reproducibility runs (call before the first CUDA matmul)."""
    if not enabled:
        return
    # cuBLAS reads this when its handle is created: set before any CUDA matmul of the process.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def resolve_sample_precision(setting: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere; others unchanged (ValueError for unknown names)."""
    if setting not in SAMPLE_PRECISIONS:
        raise ValueError(
            f"sample.precision={setting!r}; expected one of {', '.join(SAMPLE_PRECISIONS)}"
        )
    if setting == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return setting


def sampling_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a sampling forward runs in: bf16 autocast, or nothing (fp32 / tf32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
