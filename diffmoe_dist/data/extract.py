"""ImageNet-style class folder -> ADM center crop -> VAE encoder -> verified latent shards.

Input: ``root/<class_name>/<image>`` (class index = position of the class name in sorted order, as
torchvision's ImageFolder and ADM do). Output: the shard directory of ``data/latents.py`` (format
version 1): per sample the latent of the image and of its horizontal flip, both x scale_factor.

Work plan and resume:
  * Rank 0 lists the folder once and writes ``<out>/extract_state/plan.json`` (files, labels, shard
    size, options). Every rank works from that plan, so a rerun sees the same numbering; a rerun whose
    folder or options differ is refused (naming the key) instead of mixing two datasets.
  * Shard ``i`` holds samples ``[i * shard_size, (i + 1) * shard_size)`` of the plan and is written by
    rank ``i % world_size``: atomically (temporary name, then ``os.replace``), then a small record
    ``extract_state/shard-XXXXX.json`` (count, bytes, sha256). A shard whose record exists and whose
    file still matches it is skipped on a rerun; anything else is (re)encoded.
  * When all ranks are done, rank 0 writes ``manifest.json`` from the records and verifies every
    shard by reading it back through ``LatentShardDataset`` (sizes, headers, sha256, labels).
  * The VAE posterior is sampled with a generator seeded by (seed, shard index): a shard's content
    does not depend on the number of ranks or on which run wrote it.
An unreadable image or a bad folder raises ValueError naming the file; shards already written stay.

    python tools/extract_latents.py --images /data/imagenet/train --out /data/in256_latents \
        --vae /models/sd-vae-ft-mse
    torchrun --nproc-per-node 8 tools/extract_latents.py --images ... --out ... --vae ...

Rerunning the same command after an interruption encodes only the shards that are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmoe_dist.data.latents import (
    _DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SD_VAE_SCALE_FACTOR,
    LatentShardDataset,
    shard_name,
    write_shard_file,
)
from diffmoe_dist.data.vae import POSTERIORS, encode, load_vae
from diffmoe_dist.fsutil import atomic_write_bytes, fsync_dir, sha256_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".jpe")
STATE_DIR = "extract_state"


@dataclass(frozen=True)
class ExtractOptions:
    image_size: int = 256
    shard_size: int = 1024
    batch_size: int = 32  # images per VAE forward (each is encoded twice: as is and flipped)
    scale_factor: float = SD_VAE_SCALE_FACTOR
    posterior: str = "sample"  # sample | mean (see vae.encode)
    seed: int = 0
    dtype: str = "float32"  # storage dtype of the latents
    num_classes: int = 0  # 0: number of class folders


def list_image_folder(root: str | os.PathLike[str]) -> tuple[list[str], list[int], list[str]]:
    """(relative file paths, labels, class names) of an ImageFolder-style tree, sorted."""
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"image folder {base} does not exist")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(
            f"image folder {base} has no class sub-directories (want root/<class>/<image>)"
        )
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(base / name)):
            for fname in sorted(names):
                if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                    files.append(str((Path(dirpath) / fname).relative_to(base)))
                    labels.append(label)
    if not files:
        raise ValueError(
            f"image folder {base} has {len(classes)} class folders but no images "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files, labels, classes


def center_crop_arr(pil_image: Any, image_size: int) -> np.ndarray:
    """ADM's center crop: halve with BOX while >= 2x, BICUBIC resize the short side, crop the center.
    Returns uint8 HWC."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    y0 = (arr.shape[0] - image_size) // 2
    x0 = (arr.shape[1] - image_size) // 2
    return arr[y0 : y0 + image_size, x0 : x0 + image_size]


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """One image file -> float [3, S, S] in [-1, 1]; ValueError names the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            arr = center_crop_arr(im.convert("RGB"), image_size)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0


def make_plan(root: str | os.PathLike[str], opts: ExtractOptions) -> dict[str, Any]:
    if opts.shard_size <= 0 or opts.batch_size <= 0 or opts.image_size <= 0:
        raise ValueError(
            f"shard_size, batch_size and image_size must be > 0, got {opts.shard_size}, "
            f"{opts.batch_size}, {opts.image_size}"
        )
    if opts.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {opts.dtype!r}")
    files, labels, classes = list_image_folder(root)
    num_classes = opts.num_classes or len(classes)
    if num_classes < len(classes):
        raise ValueError(f"num_classes={num_classes} but {root} has {len(classes)} class folders")
    return {
        "root": str(Path(root).resolve()),
        "options": {**asdict(opts), "num_classes": num_classes},
        "classes": classes,
        "files": files,
        "labels": labels,
    }


def _check_plan(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    for key in ("options", "classes", "files", "labels"):
        if old.get(key) != new[key]:
            raise ValueError(
                f"{path}: '{key}' differs from this run's (the folder or options changed since the "
                f"extraction started); use a new output directory or delete {path.parent} and the shards"
            )


def _shard_done(out: Path, sid: int) -> bool:
    rec_path = out / STATE_DIR / f"shard-{sid:05d}.json"
    f = out / shard_name(sid)
    if not rec_path.is_file() or not f.is_file():
        return False
    try:
        rec = json.loads(rec_path.read_text())
    except json.JSONDecodeError:
        return False
    return rec.get("bytes") == f.stat().st_size and rec.get("sha256") == sha256_file(f)


def encode_shard(
    vae: Any, plan: dict[str, Any], sid: int, out: Path, device: torch.device, progress: Any = None
) -> None:
    """Encode shard ``sid`` of the plan and publish it (file, then its record)."""
    o = plan["options"]
    lo = sid * o["shard_size"]
    hi = min(lo + o["shard_size"], len(plan["files"]))
    root = Path(plan["root"])
    gen = torch.Generator(device=device).manual_seed(o["seed"] * 1_000_003 + sid)
    chunks = []
    for b in range(lo, hi, o["batch_size"]):
        idx = range(b, min(b + o["batch_size"], hi))
        x = torch.stack([load_image(root / plan["files"][i], o["image_size"]) for i in idx])
        z = encode(vae, x, o["scale_factor"], o["posterior"], gen)  # [n, C, h, w]
        zf = encode(vae, x.flip(-1), o["scale_factor"], o["posterior"], gen)  # flipped image
        chunks.append(torch.stack([z, zf], dim=1).cpu())  # [n, 2, C, h, w]
        if progress is not None:
            progress.update(len(idx))
    latents = torch.cat(chunks).to(_DTYPES[o["dtype"]][0]).contiguous()
    labels = torch.tensor(plan["labels"][lo:hi], dtype=torch.int64)
    name = shard_name(sid)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    write_shard_file(tmp, latents, labels)  # a plain file's mode, fsynced
    rec = {"file": name, "count": hi - lo, "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
    rec["latent_shape"] = list(latents.shape[2:])
    os.replace(tmp, out / name)
    atomic_write_bytes(out / STATE_DIR / f"shard-{sid:05d}.json", json.dumps(rec).encode())


def write_manifest(out: Path, plan: dict[str, Any]) -> Path:
    """Assemble manifest.json from the shard records (all must exist), then verify every shard."""
    o = plan["options"]
    num_shards = -(-len(plan["files"]) // o["shard_size"])
    shards, shapes = [], set()
    for sid in range(num_shards):
        rec_path = out / STATE_DIR / f"shard-{sid:05d}.json"
        if not rec_path.is_file():
            raise ValueError(f"shard {out / shard_name(sid)} was not written ({rec_path} missing)")
        rec = json.loads(rec_path.read_text())
        shapes.add(tuple(rec.pop("latent_shape")))
        shards.append(rec)
    if len(shapes) != 1:
        raise ValueError(f"shards under {out} have different latent shapes {sorted(shapes)}")
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "count": len(plan["files"]),
        "latent_shape": list(shapes.pop()),
        "dtype": o["dtype"],
        "num_classes": o["num_classes"],
        "scale_factor": o["scale_factor"],
        "shards": shards,
        "classes": plan["classes"],  # extra field: class index -> folder name (readers ignore it)
    }
    path = out / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(manifest, indent=1) + "\n").encode())
    fsync_dir(out)
    LatentShardDataset(out, verify="never").verify_all()
    return path


def extract(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    vae_path: str | os.PathLike[str],
    opts: ExtractOptions,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    group: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) an extraction on this rank. Every rank of ``group`` calls it; rank 0 returns
    the summary with the manifest path, the others a summary of their own work."""
    from diffmoe_dist.parallel.distributed import all_reduce_scalars, barrier

    device = torch.device(device)
    out = Path(out_dir)
    plan_path = out / STATE_DIR / "plan.json"
    if rank == 0:
        vae_dir = Path(vae_path)
        if not vae_dir.is_dir():  # fail before listing a million files
            raise ValueError(f"VAE directory {vae_dir} does not exist")
        plan = make_plan(root, opts)
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        if plan_path.is_file():
            _check_plan(plan_path, json.loads(plan_path.read_text()), plan)
        else:
            atomic_write_bytes(plan_path, json.dumps(plan).encode())
    barrier(group)
    plan = json.loads(plan_path.read_text())
    vae = load_vae(vae_path, device)
    o = plan["options"]
    num_shards = -(-len(plan["files"]) // o["shard_size"])
    mine = [s for s in range(rank, num_shards, world_size)]
    todo = [s for s in mine if not _shard_done(out, s)]
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        n_todo = sum(
            min((s + 1) * o["shard_size"], len(plan["files"])) - s * o["shard_size"] for s in todo
        )
        bar = tqdm(total=n_todo, desc=f"extract (rank 0 of {world_size})", unit="img")
    for sid in todo:
        encode_shard(vae, plan, sid, out, device, bar)
    if bar is not None:
        bar.close()
    summary: dict[str, Any] = {
        "rank": rank,
        "shards_total": num_shards,
        "shards_skipped": len(mine) - len(todo),
        "shards_written": len(todo),
    }
    if group is not None:  # summed over the ranks (float64 holds these counts exactly)
        mine_counts = [len(mine) - len(todo), len(todo)]
        skipped, written = all_reduce_scalars(mine_counts, group, device, op="sum")
        summary["shards_skipped"], summary["shards_written"] = int(skipped), int(written)
    if rank == 0:
        summary["manifest"] = str(write_manifest(out, plan))
        summary["count"] = len(plan["files"])
    barrier(group)  # nobody exits before the manifest is verified
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command line (tools/extract_latents.py); one process per rank under torchrun / srun."""
    from diffmoe_dist.parallel.distributed import cleanup, init_distributed

    p = argparse.ArgumentParser(
        prog="extract_latents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", required=True, help="root/<class>/<image> folder")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward")
    p.add_argument("--scale-factor", type=float, default=SD_VAE_SCALE_FACTOR)
    p.add_argument("--posterior", choices=POSTERIORS, default="sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    p.add_argument("--num-classes", type=int, default=0, help="default: number of class folders")
    p.add_argument("--backend", default="auto", help="auto | gloo | nccl")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    opts = ExtractOptions(
        image_size=args.image_size,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        scale_factor=args.scale_factor,
        posterior=args.posterior,
        seed=args.seed,
        dtype=args.dtype,
        num_classes=args.num_classes,
    )
    try:
        info = init_distributed(args.backend)
        import torch.distributed as dist

        summary = extract(
            args.images,
            args.out,
            args.vae,
            opts,
            rank=info.rank,
            world_size=info.world_size,
            device=info.device,
            group=dist.group.WORLD if info.world_size > 1 else None,
            progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"extract_latents: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    # info.rank, not print0: after cleanup() there is no process group, and print0 prints on every rank
    if info.rank == 0:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
