"""Inference: everything between a checkpoint and a set of samples, by concept.

    load.py      which checkpoint (``--run-dir`` / ``--checkpoint``), its config, one model with its weights
    generate.py  one batch: class labels, per-sample noise, the objective's guided sampler
    capacity.py  C_infer of a run (sampling's view of the expert telemetry)
    driver.py    the distributed sampling driver (ranks, batches, decoding, gathering)
    parts.py     the resumable parts store (``<out>/parts``)
    images.py    uint8 images, the PNG grid, samples.npz and sample_report.json
    evaluate.py  sample and score (digits judge, FID / IS / precision-recall)

The entry points ``diffmoe-sample`` and ``diffmoe-eval`` (diffmoe_dist/sample.py, evaluate.py) parse
arguments and call these.
"""

from diffmoe_dist.inference.capacity import CapacityMeter
from diffmoe_dist.inference.driver import rank_share, sample_from_checkpoint
from diffmoe_dist.inference.evaluate import evaluate_checkpoint, evaluate_samples
from diffmoe_dist.inference.generate import class_labels, generate
from diffmoe_dist.inference.images import save_grid, save_samples, to_uint8
from diffmoe_dist.inference.load import (
    LoadedModel,
    load_model,
    load_sampling_config,
    output_dir,
    resolve_checkpoint,
    resolve_with_config,
)
from diffmoe_dist.inference.parts import PartsStore, run_fingerprint

__all__ = [
    "CapacityMeter",
    "LoadedModel",
    "PartsStore",
    "class_labels",
    "evaluate_checkpoint",
    "evaluate_samples",
    "generate",
    "load_model",
    "load_sampling_config",
    "output_dir",
    "resolve_checkpoint",
    "resolve_with_config",
    "rank_share",
    "run_fingerprint",
    "sample_from_checkpoint",
    "save_grid",
    "save_samples",
    "to_uint8",
]
