"""Convert a run directory's old-format DeepSpeed checkpoints (``ds_checkpoints/``) to the project's.

Before engine=deepspeed wrote the project checkpoint (diffmoe_dist/checkpoint/), it wrote
``<run.dir>/ds_checkpoints/step-XXXXXXXX/`` with DeepSpeed's module / ZeRO files and one
``diffmoe_rankNNNNN.pt`` per rank holding that rank's model (its expert slice and thresholds), EMA,
RNG and step. A run directory in that format is refused at start-up with this command:

    python -m diffmoe_dist.trainer.convert_ds RUN_DIR        (or: diffmoe-convert-ds RUN_DIR)

It reads the per-rank files of the checkpoint named by ``ds_checkpoints/latest`` (one process, no
DeepSpeed needed), joins the expert slices by global index, and writes
``checkpoints/step-XXXXXXXX`` in the project format (manifest, atomic). Weights, EMA, thresholds and
the step carry over; the Adam moments in DeepSpeed's ZeRO shards do not (the converted checkpoint
has zero moments and step 0, i.e. Adam restarts its bias correction), which the command prints.
``ds_checkpoints`` is then renamed to ``ds_checkpoints.converted`` and can be deleted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from diffmoe_dist.checkpoint import OLD_DEEPSPEED_DIR, CheckpointManager
from diffmoe_dist.config import load_config
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.trainer.optim import build_optimizer
from diffmoe_dist.transport.objective import model_out_channels


def _join(states: list[dict[str, torch.Tensor]], model: DiffMoE) -> dict[str, torch.Tensor]:
    """Per-rank state dicts (rank order) -> the full state dict of ``model`` (ep = 1).

    Expert tensors ([local experts, ...]) are concatenated over the ranks of the first ep group
    (ranks 0..ep-1 hold global experts in order); everything else is rank 0's.
    """
    full = model.state_dict()
    out = {}
    for key, want in full.items():
        have = states[0][key]
        if have.shape == want.shape:
            out[key] = have
            continue
        n = have.shape[0]
        if want.shape[0] % n or want.shape[1:] != have.shape[1:]:
            raise ValueError(f"{key}: saved {tuple(have.shape)}, the model has {tuple(want.shape)}")
        ep = want.shape[0] // n
        if len(states) < ep:
            raise ValueError(f"{key}: ep {ep} needs {ep} rank files, found {len(states)}")
        out[key] = torch.cat([states[r][key] for r in range(ep)])
    return out


def convert(run_dir: Path) -> Path:
    """Write the project checkpoint of ``run_dir``'s latest old-format DeepSpeed checkpoint."""
    old = run_dir / OLD_DEEPSPEED_DIR
    latest = old / "latest"
    if not latest.is_file():
        raise ValueError(f"{latest} does not exist: nothing to convert in '{run_dir}'")
    tag_dir = old / latest.read_text().strip()
    files = sorted(tag_dir.glob("diffmoe_rank*.pt"))
    if not files:
        raise ValueError(f"{tag_dir} has no diffmoe_rankNNNNN.pt files")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ValueError(f"{cfg_path} is missing: the run's config names the model to rebuild")
    cfg = load_config(str(cfg_path), ["parallel.ep=1"])
    saved = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    step = int(saved[0]["step"])
    out_c = model_out_channels(cfg)  # DDPM's learned variance doubles the output channels
    model = DiffMoE(cfg.model, cfg.moe, out_channels=out_c)
    ema = DiffMoE(cfg.model, cfg.moe, out_channels=out_c)
    model.load_state_dict(_join([s["model"] for s in saved], model))
    ema.load_state_dict(_join([s["ema"] for s in saved], ema))
    optimizer = build_optimizer(model, cfg.train)  # no state: saved as zero moments, step 0
    ckpt = CheckpointManager(run_dir, cfg, 0, 1, None, cfg.train.keep_checkpoints)
    path = ckpt.save(step, model, ema, optimizer, extra={"converted_from": str(tag_dir)})
    old.rename(run_dir / f"{OLD_DEEPSPEED_DIR}.converted")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="diffmoe-convert-ds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="a run directory holding ds_checkpoints/")
    args = p.parse_args(argv)
    try:
        path = convert(Path(args.run_dir))
    except ValueError as e:
        print(f"diffmoe-convert-ds: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {path} (weights, EMA, thresholds, step; Adam moments restart from zero); the old "
        f"directory is now {Path(args.run_dir) / (OLD_DEEPSPEED_DIR + '.converted')}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
