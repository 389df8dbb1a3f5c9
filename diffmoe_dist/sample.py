"""``diffmoe-sample``: sample from a checkpoint (EMA weights by default), data-parallel with experts
sharded as in training; writes a labelled PNG grid, optionally an ``.npz`` (uint8 NHWC under
``arr_0``, labels under ``labels``), and reports C_infer per MoE layer and averaged.

    diffmoe-sample --run-dir runs/digits [--set sample.cfg_scale=2 --set moe.infer_mode=dynamic]
    torchrun --nproc-per-node 2 -m diffmoe_dist.sample --run-dir runs/digits --set parallel.ep=2

The inference rule comes from ``moe.infer_mode`` (static | dynamic | gamma | independent), with
``moe.infer_capacity`` (static) and ``moe.gamma`` (gamma). Pools at inference are pool_samples
samples of a rank's batch when they tile it, else the whole batch (see models/moe.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from diffmoe_dist.checkpoint import CheckpointManager, list_checkpoints, read_meta
from diffmoe_dist.config import Config, from_dict, merge_dicts, parse_overrides
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.parallel.distributed import cleanup, init_distributed
from diffmoe_dist.parallel.parallelize import build_parallel_state, parallelize_model
from diffmoe_dist.telemetry import ExpertTelemetry
from diffmoe_dist.transport.cfg import cfg_velocity_fn
from diffmoe_dist.transport.samplers import sample as run_sampler


class CapacityMeter:
    """Accumulates realised capacity (pairs / tokens) per MoE layer over every forward of a run.

    With ``num_classes`` it also keeps expert telemetry (diffmoe_dist/telemetry.py: tokens per
    expert, predictor precision/recall, compute by t bucket and class) over the whole run; set
    ``valid`` [B] before a batch to leave its padding samples out of the telemetry.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        world_size: int = 1,
        rank: int = 0,
        device: torch.device | None = None,
    ) -> None:
        self.pairs: list[int] = []
        self.tokens: list[int] = []
        self.telemetry = (
            ExpertTelemetry(num_classes, world_size, rank) if num_classes is not None else None
        )
        self.valid: torch.Tensor | None = None
        self.device = device

    def add(
        self, model: DiffMoE, t: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> None:
        stats = model.moe_stats()
        if self.telemetry is not None and t is not None and y is not None:
            self.telemetry.add(stats, t, y, self.valid)
        if not self.pairs:
            self.pairs, self.tokens = [0] * len(stats), [0] * len(stats)
        for i, s in enumerate(stats):
            self.pairs[i] += s.pairs
            self.tokens[i] += s.tokens

    def reduce(self, group: dist.ProcessGroup | None) -> None:
        if self.telemetry is not None:
            self.telemetry.reduce(group, self.device)  # one packed all-reduce, every rank
        if group is None or not self.pairs:
            return
        t = torch.tensor([self.pairs, self.tokens], dtype=torch.float64)
        dist.all_reduce(t, group=group)
        self.pairs, self.tokens = [int(v) for v in t[0].tolist()], [int(v) for v in t[1].tolist()]

    def summary(self) -> dict[str, Any]:
        per = [p / max(n, 1) for p, n in zip(self.pairs, self.tokens)]
        out = {"c_infer_per_layer": per, "c_infer": (sum(per) / len(per)) if per else 1.0}
        if self.telemetry is not None:
            out["telemetry"] = self.telemetry.summary()
        return out


def resolve_checkpoint(run_dir: str | None, checkpoint: str | None) -> Path:
    if checkpoint:
        path = Path(checkpoint)
        if not (path / "manifest.json").is_file():
            raise ValueError(
                f"checkpoint '{path}' has no manifest.json (not a complete checkpoint)"
            )
        return path
    if not run_dir:
        raise ValueError("give --run-dir or --checkpoint")
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    if not found:
        raise ValueError(f"no checkpoint under '{run_dir}/checkpoints'")
    return found[0]


def load_sampling_config(ckpt: Path, overrides: list[str]) -> Config:
    """The checkpoint's own resolved config, with --set overrides (sample.*, moe.infer_*, parallel.*)."""
    data = read_meta(ckpt)["config"]
    return from_dict(merge_dicts(data, parse_overrides(overrides))).validate()


def class_labels(cfg: Config, labels_arg: str | None) -> torch.Tensor:
    n, k = cfg.sample.num_samples, cfg.model.num_classes
    if labels_arg:
        given = [int(v) for v in labels_arg.split(",")]
        bad = [v for v in given if not 0 <= v < k]
        if bad:
            raise ValueError(f"--labels: classes {bad} outside [0, {k})")
        return torch.tensor([given[i % len(given)] for i in range(n)])
    if k <= 10 and n % k == 0:  # small class counts: a balanced grid, row r = class r % k
        return torch.arange(n) % k
    g = torch.Generator().manual_seed(cfg.sample.seed)
    return torch.randint(0, k, (n,), generator=g)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] -> uint8 NHWC (ADM .npz convention)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, ncol: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(ncol * 0.8, nrow * 0.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_title(str(int(labels[i])), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def generate(
    model: DiffMoE,
    cfg: Config,
    labels: torch.Tensor,
    seed_offset: int,
    device: torch.device,
    meter: CapacityMeter,
) -> torch.Tensor:
    """Sample one batch: noise from (sample.seed, global sample index), so results do not depend on ranks."""
    m, s = cfg.model, cfg.sample
    shape = (m.in_channels, m.input_size, m.input_size)
    z0 = torch.stack(
        [
            torch.randn(
                shape, generator=torch.Generator().manual_seed(s.seed * 1_000_003 + seed_offset + i)
            )
            for i in range(len(labels))
        ]
    ).to(device)

    def counted(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x, t, y)
        meter.add(model, t, y)
        return out

    vfn = cfg_velocity_fn(
        counted, labels.to(device), s.cfg_scale, m.num_classes, pool_mode=s.cfg_pool
    )
    kw: dict[str, Any] = {} if s.sampler == "dopri5" else {"num_steps": s.num_steps}
    if s.sampler == "sde":
        kw["generator"] = torch.Generator(device=device).manual_seed(s.seed + seed_offset)
    return run_sampler(s.sampler, vfn, z0, **kw).x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="diffmoe-sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", help="training run directory (its latest checkpoint is used)")
    p.add_argument("--checkpoint", help="a checkpoint directory (…/checkpoints/step-XXXXXXXX)")
    p.add_argument("--out", help="output directory (default: <run-dir>/samples)")
    p.add_argument("--npz", action="store_true", help="also write samples.npz (uint8 NHWC, arr_0)")
    p.add_argument("--labels", help="comma-separated class labels to cycle through")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.run_dir, args.checkpoint)
        cfg = load_sampling_config(ckpt, args.overrides)
        labels = class_labels(cfg, args.labels)
    except ValueError as e:
        print(f"diffmoe-sample: error: {e}", file=sys.stderr)
        return 2
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    try:
        return _run(cfg, ckpt, labels, info, args)
    except ValueError as e:
        print(f"diffmoe-sample: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()


def sample_from_checkpoint(
    cfg: Config, ckpt: Path, labels: torch.Tensor, info: Any
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """All ranks take part; rank 0 gets (uint8 NHWC images [N, H, W, C], report), others (None, report)."""
    W, rank = info.world_size, info.rank
    if cfg.data.name != "digits":
        raise ValueError(
            "decoding latents needs a VAE; this sampler writes images for pixel-space data "
            "(data.name=digits) only"
        )
    if cfg.sample.sampler == "dopri5" and cfg.parallel.ep > 1:
        raise ValueError(
            "sample.sampler=dopri5 takes a different number of steps per rank, which cannot "
            "drive the expert all-to-all (parallel.ep > 1); use euler, heun or sde"
        )
    ps = build_parallel_state(_sampling_layout(cfg, W), W, rank)
    model = parallelize_model(DiffMoE(cfg.model, cfg.moe), ps)
    ema = parallelize_model(DiffMoE(cfg.model, cfg.moe), ps)
    CheckpointManager(ckpt.parent.parent, cfg, rank, W, ps.world_group).load(ckpt, model, ema, None)
    net = (ema if cfg.sample.use_ema else model).to(info.device).eval()
    if cfg.moe.mode != "dense":
        net.set_inference(cfg.moe.infer_mode, cfg.moe.infer_capacity, cfg.moe.gamma)
    n, bs = cfg.sample.num_samples, cfg.sample.batch_size
    per_rank = math.ceil(n / W)
    # Every rank runs the same number of equally sized batches (the dispatcher's collectives need it);
    # the padding samples are dropped at the end.
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    meter = CapacityMeter(cfg.model.num_classes, W, rank, info.device)
    outs = []
    for start in range(0, per_rank, bs):
        idx = mine[start : start + bs]
        lab = labels[idx.clamp(max=n - 1)]
        meter.valid = idx < n  # padding samples stay out of the telemetry
        outs.append(generate(net, cfg, lab, int(idx[0]), info.device, meter).float().cpu())
    local = torch.cat(outs)
    meter.reduce(ps.world_group)
    if ps.world_group is not None:
        gathered = [torch.empty_like(local) for _ in range(W)]
        dist.all_gather(gathered, local, group=ps.world_group)
        local = torch.cat(gathered)
    report = {
        "checkpoint": str(ckpt),
        "num_samples": n,
        "sampler": cfg.sample.sampler,
        "num_steps": cfg.sample.num_steps,
        "cfg_scale": cfg.sample.cfg_scale,
        "infer_mode": cfg.moe.infer_mode,
        "use_ema": cfg.sample.use_ema,
        **meter.summary(),
    }
    return (to_uint8(local[:n]) if rank == 0 else None), report


def _run(cfg: Config, ckpt: Path, labels: torch.Tensor, info: Any, args: argparse.Namespace) -> int:
    images, report = sample_from_checkpoint(cfg, ckpt, labels, info)
    if images is None:
        return 0
    n = len(images)
    out = Path(args.out) if args.out else ckpt.parent.parent / "samples"
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images[: min(n, 100)], labels[: min(n, 100)].numpy(), out / "grid.png")
    if args.npz:
        tmp = out / "samples.tmp.npz"
        np.savez(tmp, arr_0=images, labels=labels.numpy())
        tmp.replace(out / "samples.npz")
    (out / "sample_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report), flush=True)
    return 0


def _sampling_layout(cfg: Config, world_size: int) -> Config:
    """Sampling has no global training batch: validate the layout with one sample per rank pool."""
    d = cfg.to_dict()
    d["train"]["global_batch_size"] = world_size * cfg.moe.pool_samples
    return from_dict(d).validate()


if __name__ == "__main__":
    sys.exit(main())
