"""``diffmoe-sample``: sample from a checkpoint (EMA weights by default), data-parallel with experts
sharded as in training; writes a labelled PNG grid, optionally an ``.npz`` (uint8 NHWC under
``arr_0``, labels under ``labels``), and reports C_infer per MoE layer and averaged.

    diffmoe-sample --run-dir runs/digits [--set sample.cfg_scale=2 --set moe.infer_mode=dynamic]
    torchrun --nproc-per-node 2 -m diffmoe_dist.sample --run-dir runs/digits --set parallel.ep=2

The sampler belongs to the checkpoint's objective (``objective``): flow samples with ``sample.sampler``
euler | heun | dopri5 | sde, ddpm with ddpm (ancestral, respaced to ``sample.num_steps``) | ddim; see
transport/objective.py. ``sample.cfg_pool: auto`` picks separate CFG forwards under flow and one
joint forward under ddpm (the public code's choice).

The inference rule comes from ``moe.infer_mode`` (static | dynamic | gamma | independent), with
``moe.infer_capacity`` (static) and ``moe.gamma`` (gamma). Pools at inference are pool_samples
samples of a rank's batch when they tile it, else the whole batch (see models/moe.py).

Latent models (data.name=latents) are decoded with a local VAE: ``--vae DIR``. Each finished batch is
saved under ``<out>/parts`` (atomically); rerunning the same command samples only the missing
indices (``parts/run.json`` refuses a rerun with other settings) and C_infer covers the whole run.
Note: with the paper's pool rule a sample depends on its batch-mates, so a resumed run is a valid
sample of the same model but not bit-identical to an uninterrupted one (``independent`` is).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from diffmoe_dist.checkpoint import (
    CheckpointVanished,
    latest_verified,
    no_verified_checkpoint_message,
    read_meta,
    require_verified,
)
from diffmoe_dist.config import Config, from_dict, merge_dicts, parse_overrides
from diffmoe_dist.inference.load import load_model
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.parallel.distributed import (
    barrier,
    cleanup,
    gather_rows_to_rank0,
    init_distributed,
)
from diffmoe_dist.parallel.numerics import resolve_sample_precision, sampling_autocast, set_tf32
from diffmoe_dist.telemetry import ExpertTelemetry
from diffmoe_dist.transport.cfg import cfg_velocity_fn
from diffmoe_dist.transport.objective import cfg_pool_for, get_objective


class CapacityMeter:
    """Sampling's view of the expert telemetry (diffmoe_dist/telemetry.py owns every counter).

    C_infer per MoE layer = (token, expert) pairs / tokens over every forward of the run, of the
    kept samples: set ``valid`` [B] before a batch to leave its padding samples out. ``reduce`` is
    the telemetry's one packed all-reduce; ``use_totals`` replaces the counts by those summed over
    the parts on disk (a resumed run).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        world_size: int = 1,
        rank: int = 0,
        device: torch.device | None = None,
    ) -> None:
        # num_classes None: taken from the model at the first forward (model.num_classes)
        self._shape = (world_size, rank)
        self.telemetry: ExpertTelemetry | None = (
            ExpertTelemetry(num_classes, world_size, rank) if num_classes is not None else None
        )
        self.valid: torch.Tensor | None = None
        self.device = device
        self._totals: tuple[list[int], list[int]] | None = None

    def _sizes(self, col: int) -> list[int]:
        if self.telemetry is None:
            return []
        return [int(v) for v in self.telemetry.sizes[:, col].tolist()]

    @property
    def pairs(self) -> list[int]:
        return self._sizes(0)

    @property
    def tokens(self) -> list[int]:
        return self._sizes(1)

    def add(self, model: DiffMoE, t: torch.Tensor, y: torch.Tensor) -> None:
        if self.telemetry is None:
            self.telemetry = ExpertTelemetry(model.num_classes, *self._shape)
        self.telemetry.add(model.moe_stats(), t, y, self.valid)

    def reduce(self, group: dist.ProcessGroup | None) -> None:
        if self.telemetry is not None:
            self.telemetry.reduce(group, self.device)  # one packed all-reduce, every rank

    def use_totals(self, pairs: list[int], tokens: list[int]) -> None:
        self._totals = (pairs, tokens)

    def summary(self) -> dict[str, Any]:
        pairs, tokens = self._totals or (self.pairs, self.tokens)
        per = [p / max(n, 1) for p, n in zip(pairs, tokens)]
        out = {"c_infer_per_layer": per, "c_infer": (sum(per) / len(per)) if per else 1.0}
        if self.telemetry is not None:
            out["telemetry"] = self.telemetry.summary()
        return out


def resolve_checkpoint(run_dir: str | None, checkpoint: str | None) -> Path:
    """``--checkpoint`` if it verifies, else the newest checkpoint of ``--run-dir`` that verifies.

    Read-only (checkpoint.latest_verified): safe while a trainer is writing the run. A bad
    checkpoint is skipped with a warning naming the file; ValueError when none verifies.
    """
    if checkpoint:
        return require_verified(checkpoint)
    if not run_dir:
        raise ValueError("give --run-dir or --checkpoint")
    root = Path(run_dir) / "checkpoints"
    found = latest_verified(root)
    if found is None:
        raise ValueError(no_verified_checkpoint_message(root))
    return found


def output_dir(ckpt: Path, out: str | None, name: str = "samples") -> Path:
    """Where outputs go: ``--out``, else ``<run>/<name>`` for a checkpoint inside a run directory
    (``<run>/checkpoints/<step>``). A checkpoint elsewhere has no run to write into: --out is required
    (two levels up from it could be anything)."""
    if out:
        return Path(out)
    if ckpt.resolve().parent.name != "checkpoints":
        raise ValueError(
            f"--checkpoint {ckpt} is not inside a run directory (<run>/checkpoints/<step>), so there "
            f"is no <run>/{name} to write to: give --out DIR"
        )
    return ckpt.resolve().parent.parent / name


def load_sampling_config(ckpt: Path, overrides: list[str]) -> Config:
    """The checkpoint's own resolved config, with --set overrides (sample.*, moe.infer_*, parallel.*)."""
    try:
        data = read_meta(ckpt)["config"]
    except FileNotFoundError:
        raise CheckpointVanished(
            f"checkpoint {ckpt} was removed before it could be read (pruned by a live trainer?)"
        ) from None
    return from_dict(merge_dicts(data, parse_overrides(overrides))).validate()


def resolve_with_config(
    run_dir: str | None, checkpoint: str | None, overrides: list[str]
) -> tuple[Path, Config]:
    """resolve_checkpoint + load_sampling_config. With --run-dir, a checkpoint that a live trainer
    prunes in between is replaced by the newest one that verifies (a few tries)."""
    for attempt in range(5):
        ckpt = resolve_checkpoint(run_dir, checkpoint)
        try:
            return ckpt, load_sampling_config(ckpt, overrides)
        except CheckpointVanished:
            if checkpoint or attempt == 4:
                raise
    raise AssertionError("unreachable")


def class_labels(cfg: Config, labels_arg: str | None) -> torch.Tensor:
    n, k = cfg.sample.num_samples, cfg.model.num_classes
    if labels_arg:
        try:
            given = [int(v) for v in labels_arg.split(",")]
        except ValueError:
            raise ValueError(
                f"--labels {labels_arg!r}: expected comma-separated class indices (integers), "
                "e.g. --labels 0,3,7"
            ) from None
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
    seed_offset: int | torch.Tensor,
    device: torch.device,
    meter: CapacityMeter,
) -> torch.Tensor:
    """Sample one batch: noise from (sample.seed, global sample index), so results do not depend on ranks.

    ``seed_offset``: the global index of the first sample (indices consecutive), or all indices [B].
    """
    m, s = cfg.model, cfg.sample
    shape = (m.in_channels, m.input_size, m.input_size)
    if isinstance(seed_offset, torch.Tensor):
        offsets = [int(v) for v in seed_offset.tolist()]
    else:
        offsets = [seed_offset + i for i in range(len(labels))]
    z0 = torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(s.seed * 1_000_003 + o))
            for o in offsets
        ]
    ).to(device)

    obj = get_objective(cfg.objective)
    precision = resolve_sample_precision(s.precision, device)

    def counted(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with sampling_autocast(precision, device):  # bf16: the model only; the ODE stays fp32
            out = model(x, t, y).float()
        meter.add(model, obj.flow_time(t), y)  # telemetry buckets in the flow convention
        return out

    vfn = cfg_velocity_fn(
        counted,
        labels.to(device),
        s.cfg_scale,
        m.num_classes,
        pool_mode=cfg_pool_for(cfg),
        guided_channels=obj.guided_channels(m.in_channels),
    )
    # Stochastic samplers (flow sde, ddpm ancestral) draw from one generator per batch.
    gen = torch.Generator(device=device).manual_seed(s.seed + offsets[0])
    return obj.sample(s.sampler, vfn, z0, s.num_steps, gen).x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="diffmoe-sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", help="training run directory (its latest checkpoint is used)")
    p.add_argument("--checkpoint", help="a checkpoint directory (…/checkpoints/step-XXXXXXXX)")
    p.add_argument(
        "--out",
        help="output directory (default: <run>/samples of the checkpoint's run; required for a "
        "--checkpoint outside a run directory)",
    )
    p.add_argument("--npz", action="store_true", help="also write samples.npz (uint8 NHWC, arr_0)")
    p.add_argument("--labels", help="comma-separated class labels to cycle through")
    p.add_argument(
        "--vae", help="local diffusers AutoencoderKL directory (needed for data.name=latents)"
    )
    p.add_argument(
        "--keep-parts",
        action="store_true",
        help="keep <out>/parts (per-batch files) after finishing",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        ckpt, cfg = resolve_with_config(args.run_dir, args.checkpoint, args.overrides)
        labels = class_labels(cfg, args.labels)
        args.out = str(output_dir(ckpt, args.out))
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
    cfg: Config,
    ckpt: Path,
    labels: torch.Tensor,
    info: Any,
    vae_dir: str | None = None,
    parts_dir: Path | None = None,
    follow_latest: bool = False,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """All ranks take part; rank 0 gets (uint8 NHWC images [N, H, W, C], report), others (None, report).

    One model is built and loaded (diffmoe_dist.inference.load_model: read-only, rank 0's ``ckpt``
    on every rank). ``follow_latest``: ``ckpt`` is "the run's latest", so when a live trainer prunes it while
    it is read, the newest checkpoint that verifies is used instead (the report names the one used).

    data.name=latents decodes with the VAE in ``vae_dir`` (on every rank, batch by batch). With
    ``parts_dir`` (a directory every rank can reach) each batch is saved there as it finishes
    (images, labels, its C_infer counts) and a rerun samples only the indices not yet on disk;
    C_infer is then summed over all parts, i.e. over the whole run.
    """
    W, rank = info.world_size, info.rank
    if cfg.data.name == "latents" and not vae_dir:
        raise ValueError(
            "data.name=latents: decoding the samples needs a VAE; pass --vae DIR (a local diffusers "
            "AutoencoderKL directory, e.g. sd-vae-ft-mse saved with save_pretrained)"
        )
    if cfg.sample.sampler == "dopri5" and cfg.parallel.ep > 1:
        raise ValueError(
            "sample.sampler=dopri5 takes a different number of steps per rank, which cannot "
            "drive the expert all-to-all (parallel.ep > 1); use euler, heun or sde"
        )
    vae = None
    if cfg.data.name == "latents":
        from diffmoe_dist.data.vae import decode, load_vae

        vae = load_vae(vae_dir, info.device)  # before the model: a bad path fails fast
    # one model for the sampling layout, EMA or live weights (sample.use_ema), inference rule set
    loaded = load_model(cfg, ckpt, rank, W, info.device, follow_latest=follow_latest)
    net, ps, ckpt = loaded.net, loaded.ps, loaded.checkpoint
    precision = resolve_sample_precision(cfg.sample.precision, info.device)
    set_tf32(precision != "fp32")  # TF32 for the fp32 matmuls unless exact fp32 was asked for
    n, bs = cfg.sample.num_samples, cfg.sample.batch_size
    done: set[int] = set()
    if parts_dir is not None:
        done = _parts_prepare(parts_dir, _run_fingerprint(cfg, ckpt, labels), n, rank)
    barrier(ps.world_group)  # every rank has listed the parts before any is written
    todo = torch.tensor(sorted(set(range(n)) - done), dtype=torch.long)
    per_rank = math.ceil(len(todo) / W)
    # Every rank runs the same number of equally sized batches (the dispatcher's collectives need it);
    # padding positions repeat the last index and are dropped.
    pos = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    valid_pos = pos < len(todo)
    mine = todo[pos.clamp(max=max(len(todo) - 1, 0))] if len(todo) else pos
    meter = CapacityMeter(cfg.model.num_classes, W, rank, info.device)
    scale = _latent_scale(cfg)
    outs = []
    for start in range(0, per_rank, bs):
        idx, valid = mine[start : start + bs], valid_pos[start : start + bs]
        meter.valid = valid  # padding samples stay out of the telemetry
        before = (list(meter.pairs), list(meter.tokens))
        x = generate(net, cfg, labels[idx], idx, info.device, meter).float()
        images = to_uint8(decode(vae, x, scale) if vae is not None else x)
        if parts_dir is None:
            outs.append(torch.from_numpy(images))
        elif bool(valid.any()):
            pairs = [a - b for a, b in zip(meter.pairs, before[0] or [0] * len(meter.pairs))]
            tokens = [a - b for a, b in zip(meter.tokens, before[1] or [0] * len(meter.tokens))]
            keep = valid.numpy()
            _write_part(
                parts_dir, rank, idx[valid], images[keep], labels[idx[valid]], pairs, tokens
            )
    meter.reduce(ps.world_group)
    result = None
    if parts_dir is not None:
        barrier(ps.world_group)  # all parts are on disk
        if rank == 0:
            result, pairs, tokens = _read_parts(parts_dir, n)
            meter.use_totals(pairs, tokens)
    else:
        # uint8 images [per_rank, H, W, C] travel through the device (NCCL takes CUDA tensors only)
        gathered = gather_rows_to_rank0(torch.cat(outs), ps.world_group, info.device)
        result = gathered[:n].numpy() if gathered is not None else None
    report = {
        "checkpoint": str(ckpt),
        "num_samples": n,
        "resumed_samples": len(done),  # found on disk; C_infer covers them too (telemetry does not)
        "sampler": cfg.sample.sampler,
        "num_steps": cfg.sample.num_steps,
        "cfg_scale": cfg.sample.cfg_scale,
        "cfg_pool": cfg_pool_for(cfg),
        "objective": cfg.objective,
        "infer_mode": cfg.moe.infer_mode,
        "use_ema": cfg.sample.use_ema,
        "precision": precision,
        **meter.summary(),
    }
    return result, report


def _latent_scale(cfg: Config) -> float:
    """The latents' scale factor: the dataset manifest's when it is readable here, else SD's 0.18215."""
    from diffmoe_dist.data.latents import SD_VAE_SCALE_FACTOR, read_manifest

    if cfg.data.name == "latents" and cfg.data.path:
        try:
            return float(read_manifest(cfg.data.path)["scale_factor"])
        except ValueError:
            pass
    return SD_VAE_SCALE_FACTOR


def _run_fingerprint(cfg: Config, ckpt: Path, labels: torch.Tensor) -> dict[str, Any]:
    """What the samples depend on: a rerun into the same parts directory must match it."""
    s, m = cfg.sample, cfg.moe
    return {
        "checkpoint": str(ckpt.resolve()),
        "num_samples": s.num_samples,
        "labels_sha256": hashlib.sha256(labels.to(torch.int64).numpy().tobytes()).hexdigest(),
        "sampler": s.sampler,
        "num_steps": s.num_steps,
        "cfg_scale": s.cfg_scale,
        "cfg_pool": s.cfg_pool,
        "seed": s.seed,
        "use_ema": s.use_ema,
        "infer": [m.infer_mode, m.infer_capacity, m.gamma],
        "precision": s.precision,
    }


def _parts_prepare(parts_dir: Path, fingerprint: dict[str, Any], n: int, rank: int) -> set[int]:
    """Check (rank 0: create) parts_dir/run.json; return the sample indices already on disk."""
    run_file = parts_dir / "run.json"
    if rank == 0:
        parts_dir.mkdir(parents=True, exist_ok=True)
        if run_file.is_file():
            old = json.loads(run_file.read_text())
            diff = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
            if diff and not any(parts_dir.glob("part-*.npz")):
                diff = []  # a run that stopped before its first part: nothing to keep or mix
                run_file.write_text(json.dumps(fingerprint, indent=1))
            if diff:
                raise ValueError(
                    f"{run_file}: these samples were made with different {diff}; use another --out "
                    f"or delete {parts_dir}"
                )
        else:
            run_file.write_text(json.dumps(fingerprint, indent=1))
    done: set[int] = set()
    for f in sorted(parts_dir.glob("part-*.npz")):
        with np.load(f) as d:
            done.update(int(i) for i in d["indices"] if 0 <= int(i) < n)
    return done


def _write_part(
    parts_dir: Path,
    rank: int,
    indices: torch.Tensor,
    images: np.ndarray,
    labels: torch.Tensor,
    pairs: list[int],
    tokens: list[int],
) -> None:
    name = f"part-{int(indices[0]):08d}-r{rank:04d}.npz"
    tmp = parts_dir / f".{name}.tmp"
    with open(tmp, "wb") as f:
        np.savez(
            f,
            indices=indices.numpy(),
            images=images,
            labels=labels.numpy(),
            pairs=np.asarray(pairs, np.int64),
            tokens=np.asarray(tokens, np.int64),
        )
    tmp.replace(parts_dir / name)  # atomic: a part is complete or absent


def _read_parts(parts_dir: Path, n: int) -> tuple[np.ndarray, list[int], list[int]]:
    """All samples [n, H, W, C] from the parts, and the C_infer counts summed over them."""
    images: np.ndarray | None = None
    have = np.zeros(n, dtype=bool)
    pairs: np.ndarray | None = None
    tokens: np.ndarray | None = None
    for f in sorted(parts_dir.glob("part-*.npz")):
        with np.load(f) as d:
            idx, imgs = d["indices"], d["images"]
            if images is None:
                images = np.zeros((n, *imgs.shape[1:]), dtype=np.uint8)
            if imgs.shape[1:] != images.shape[1:]:
                raise ValueError(
                    f"{f}: images {imgs.shape[1:]} differ from the others' {images.shape[1:]}"
                )
            images[idx], have[idx] = imgs, True
            pairs = d["pairs"] if pairs is None else pairs + d["pairs"]
            tokens = d["tokens"] if tokens is None else tokens + d["tokens"]
    if images is None or not have.all():
        missing = np.flatnonzero(~have)
        raise ValueError(
            f"{parts_dir}: {len(missing)} of {n} samples missing (first {missing[:5].tolist()})"
        )
    return images, [int(v) for v in pairs], [int(v) for v in tokens]  # type: ignore[union-attr]


def _run(cfg: Config, ckpt: Path, labels: torch.Tensor, info: Any, args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else output_dir(ckpt, None)
    parts = out / "parts"
    images, report = sample_from_checkpoint(
        cfg, ckpt, labels, info, args.vae, parts, follow_latest=not args.checkpoint
    )
    if images is None:
        return 0
    n = len(images)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images[: min(n, 100)], labels[: min(n, 100)].numpy(), out / "grid.png")
    if args.npz:
        tmp = out / "samples.tmp.npz"
        np.savez(tmp, arr_0=images, labels=labels.numpy())
        tmp.replace(out / "samples.npz")
    (out / "sample_report.json").write_text(json.dumps(report, indent=1))
    if not args.keep_parts:
        shutil.rmtree(parts)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
