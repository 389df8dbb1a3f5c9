"""Pre-extracted VAE latents (ImageNet 256 -> sd-vae-ft-mse -> 4x32x32) as verified shards.

On-disk format, version 1 (a directory)::

    manifest.json                 written last; a directory without it is not a dataset
    shard-00000.safetensors       tensors "latents" [n, 2, C, H, W] and "labels" [n] int64
    shard-00001.safetensors       ...

``latents[i, 0]`` is sample i as extracted, ``latents[i, 1]`` its horizontally flipped image run
through the VAE (flipping a latent is not the same as encoding a flipped image, so both are
stored). Latents are stored *already multiplied* by ``scale_factor`` (0.18215 for SD VAEs), i.e.
ready for the model; divide by it before decoding. Samples are numbered across shards in manifest
order.

manifest.json fields::

    format          "diffmoe-latent-shards"
    format_version  1
    count           total samples (== sum of shard counts)
    latent_shape    [C, H, W] (H == W)
    dtype           "float32" | "float16" | "bfloat16"
    num_classes     labels lie in [0, num_classes)
    scale_factor    float, e.g. 0.18215
    shards          [{"file": "shard-00000.safetensors", "count": n, "sha256": hex, "bytes": size}]

Writes are atomic: every shard goes to a temporary name and is ``os.replace``d into place, and the
manifest is written the same way after all shards, so a reader sees either a complete dataset or
none. Shards are written with the mode a plain file gets (0666 less the umask, like the manifest).

Reading memory-maps the shards (random access reads only the requested rows). On open, every shard's
size and safetensors header (tensor names, dtypes, shapes [count, 2, C, H, W] against the manifest)
are checked, so a missing, truncated or mismatched shard fails at start-up with its name. Checksums
(``data.verify``): ``always`` hashes every shard on open; ``auto`` (default) does so when the set is at
most ``VERIFY_AUTO_MAX_BYTES`` (4 GiB: seconds to hash) and otherwise hashes each shard on its first
read; ``never`` skips hashing. For a large set, ``python tools/verify_latents.py DIR`` (data/verify.py)
is the start-up pass run once, ahead of training.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from diffmoe_dist.config import LATENT_VERIFY_MODES
from diffmoe_dist.data.sampler import validate_batch_request
from diffmoe_dist.fsutil import atomic_write_bytes, fsync_dir, sha256_file

FORMAT_NAME = "diffmoe-latent-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SD_VAE_SCALE_FACTOR = 0.18215
# data.verify=auto hashes the whole set on open up to this size (sha256 runs at about 0.5-1 GB/s per
# core, so a few seconds); above it each shard is hashed when first read.
VERIFY_AUTO_MAX_BYTES = 4 << 30

# name -> (torch dtype, numpy dtype used for the memmap, safetensors dtype tag)
_DTYPES: dict[str, tuple[torch.dtype, Any, str]] = {
    "float32": (torch.float32, np.float32, "F32"),
    "float16": (torch.float16, np.float16, "F16"),
    # numpy has no bfloat16: map the raw 16-bit words and reinterpret them in torch.
    "bfloat16": (torch.bfloat16, np.uint16, "BF16"),
}


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.safetensors"


def write_shard_file(path: Path, latents: torch.Tensor, labels: torch.Tensor) -> None:
    """Write one shard (latents [n, 2, C, H, W], labels [n] int64) to ``path`` and fsync it.

    safetensors creates its file with mode 0600; the shard gets a plain file's mode (0666 less the
    umask, as the manifest has), so a dataset prepared by one user is readable by the others.
    """
    save_file(
        {"latents": latents, "labels": labels},
        str(path),
        metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)},
    )
    os.chmod(path, 0o666 & ~_umask())
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


class LatentShardWriter:
    """Streams latents into shards of ``shard_size`` samples; ``close()`` writes the manifest.

    Use as a context manager: on an exception the manifest is not written, so the partial output
    stays invisible to readers.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        shard_size: int,
        num_classes: int = 1000,
        scale_factor: float = SD_VAE_SCALE_FACTOR,
        overwrite: bool = False,
    ) -> None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
            raise ValueError(f"shard_size must be an int > 0, got {shard_size!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be an int > 0, got {num_classes!r}")
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {scale_factor!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.out_dir / MANIFEST_NAME
        if manifest.exists():
            if not overwrite:
                raise ValueError(f"{manifest} already exists (pass overwrite=True to replace it)")
            # Hide the old dataset first: from here on a reader sees no dataset until close().
            manifest.unlink()
            fsync_dir(self.out_dir)
        self.shard_size = shard_size
        self.num_classes = num_classes
        self.scale_factor = float(scale_factor)
        self.latent_shape: tuple[int, int, int] | None = None
        self.dtype_name: str | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # ([k, 2, C, H, W], [k])
        self._num_pending = 0
        self._shards: list[dict[str, Any]] = []
        self._closed = False

    def add(self, latents: torch.Tensor, flipped: torch.Tensor, labels: torch.Tensor) -> None:
        """Append samples: latents and flipped [n, C, H, W] (same dtype), labels [n] integer."""
        if self._closed:
            raise ValueError("LatentShardWriter.add called after close()")
        if latents.dim() != 4 or flipped.shape != latents.shape:
            raise ValueError(
                f"latents and flipped must both be [n, C, H, W] of the same shape, got "
                f"{tuple(latents.shape)} and {tuple(flipped.shape)}"
            )
        if flipped.dtype != latents.dtype:
            raise ValueError(f"flipped dtype {flipped.dtype} != latents dtype {latents.dtype}")
        n, c, h, w = latents.shape
        if h != w:
            raise ValueError(f"latents must be square, got H={h} W={w}")
        if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be an integer tensor of shape ({n},), got {tuple(labels.shape)} "
                f"dtype {labels.dtype}"
            )
        names = [k for k, v in _DTYPES.items() if v[0] == latents.dtype]
        if not names:
            raise ValueError(f"latents dtype must be one of {list(_DTYPES)}, got {latents.dtype}")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got min {int(labels.min())} "
                f"max {int(labels.max())}"
            )
        if self.latent_shape is None:
            self.latent_shape, self.dtype_name = (c, h, w), names[0]
        elif (c, h, w) != self.latent_shape or names[0] != self.dtype_name:
            raise ValueError(
                f"latents [C, H, W]={[c, h, w]} dtype {names[0]} differ from the first batch's "
                f"{list(self.latent_shape)} dtype {self.dtype_name}"
            )
        both = torch.stack([latents.detach().cpu(), flipped.detach().cpu()], dim=1)
        self._pending.append((both, labels.detach().cpu().to(torch.int64)))
        self._num_pending += n
        while self._num_pending >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        lat = torch.cat([p[0] for p in self._pending])
        lab = torch.cat([p[1] for p in self._pending])
        rest = (lat[count:], lab[count:])
        self._pending = [rest] if rest[1].numel() else []
        self._num_pending = int(rest[1].numel())
        name = shard_name(len(self._shards))
        path = self.out_dir / name
        tmp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        write_shard_file(tmp, lat[:count].contiguous(), lab[:count].contiguous())
        entry = {
            "file": name,
            "count": count,
            "sha256": sha256_file(tmp),
            "bytes": tmp.stat().st_size,
        }
        os.replace(tmp, path)
        self._shards.append(entry)

    def close(self) -> Path:
        """Write the last (possibly short) shard and the manifest; returns the manifest path."""
        if self._closed:
            raise ValueError("LatentShardWriter.close called twice")
        if self._num_pending:
            self._flush(self._num_pending)
        if not self._shards or self.latent_shape is None:
            raise ValueError(f"no samples were added to {self.out_dir}; refusing an empty dataset")
        # Shards of an overwritten, larger dataset would otherwise linger next to the new ones.
        keep = {s["file"] for s in self._shards}
        for old in self.out_dir.glob("shard-*.safetensors"):
            if old.name not in keep:
                old.unlink()
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "count": sum(s["count"] for s in self._shards),
            "latent_shape": list(self.latent_shape),
            "dtype": self.dtype_name,
            "num_classes": self.num_classes,
            "scale_factor": self.scale_factor,
            "shards": self._shards,
        }
        path = self.out_dir / MANIFEST_NAME
        atomic_write_bytes(path, (json.dumps(manifest, indent=1) + "\n").encode())
        fsync_dir(self.out_dir)
        self._closed = True
        return path

    def __enter__(self) -> LatentShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True  # no manifest: the partial output stays invisible


def write_latent_shards(
    out_dir: str | os.PathLike[str],
    latents: torch.Tensor,
    flipped: torch.Tensor,
    labels: torch.Tensor,
    shard_size: int,
    *,
    num_classes: int = 1000,
    scale_factor: float = SD_VAE_SCALE_FACTOR,
    overwrite: bool = False,
) -> Path:
    """Write in-memory latents [N, C, H, W], flipped [N, C, H, W], labels [N]; returns manifest."""
    with LatentShardWriter(
        out_dir,
        shard_size=shard_size,
        num_classes=num_classes,
        scale_factor=scale_factor,
        overwrite=overwrite,
    ) as writer:
        writer.add(latents, flipped, labels)
    return Path(out_dir) / MANIFEST_NAME


def _field(manifest: dict[str, Any], key: str, kind: type | tuple[type, ...], where: object) -> Any:
    if key not in manifest:
        raise ValueError(f"{where}: missing field {key!r}")
    value = manifest[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where}: field {key!r} has type {type(value).__name__}, got {value!r}")
    return value


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate ``<path>/manifest.json``; ValueError names the field that is wrong."""
    where = Path(path) / MANIFEST_NAME
    if not where.is_file():
        raise ValueError(
            f"{where} not found: not a latent shard directory (or an unfinished write)"
        )
    try:
        manifest = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: top level must be an object")
    if _field(manifest, "format", str, where) != FORMAT_NAME:
        raise ValueError(f"{where}: field 'format' is {manifest['format']!r}, want {FORMAT_NAME!r}")
    version = _field(manifest, "format_version", int, where)
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: field 'format_version' is {version}, this reader knows 1")
    count = _field(manifest, "count", int, where)
    shape = _field(manifest, "latent_shape", list, where)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{where}: field 'latent_shape' must be 3 positive ints, got {shape}")
    if shape[1] != shape[2]:
        raise ValueError(f"{where}: field 'latent_shape' must have H == W, got {shape}")
    dtype = _field(manifest, "dtype", str, where)
    if dtype not in _DTYPES:
        raise ValueError(f"{where}: field 'dtype' must be one of {list(_DTYPES)}, got {dtype!r}")
    if _field(manifest, "num_classes", int, where) <= 0:
        raise ValueError(f"{where}: field 'num_classes' must be > 0, got {manifest['num_classes']}")
    if not _field(manifest, "scale_factor", (int, float), where) > 0:
        raise ValueError(f"{where}: field 'scale_factor' must be > 0")
    shards = _field(manifest, "shards", list, where)
    if not shards:
        raise ValueError(f"{where}: field 'shards' is empty")
    for i, s in enumerate(shards):
        sw = f"{where}: shards[{i}]"
        if not isinstance(s, dict):
            raise ValueError(f"{sw} must be an object")
        name = _field(s, "file", str, sw)
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"{sw}: field 'file' must be a plain file name, got {name!r}")
        if _field(s, "count", int, sw) <= 0 or _field(s, "bytes", int, sw) <= 0:
            raise ValueError(f"{sw}: fields 'count' and 'bytes' must be > 0, got {s}")
        digest = _field(s, "sha256", str, sw)
        if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
            raise ValueError(f"{sw}: field 'sha256' must be 64 lowercase hex digits")
    total = sum(s["count"] for s in shards)
    if total != count:
        raise ValueError(f"{where}: field 'count' is {count} but the shard counts sum to {total}")
    return manifest


class LatentShardDataset:
    """Random access over a latent shard directory with the ``get_batch(indices, flip)`` API.

    ``image_size`` is the latent's spatial size H (= W) and ``channels`` its C: what the model
    sees. Opening checks every shard's size and header against the manifest; ``verify`` (one of
    ``LATENT_VERIFY_MODES``, the ``data.verify`` key) says when the sha256 checksums are checked:
    see the module docstring. ``auto_max_bytes`` is the ``auto`` threshold (a knob for tests).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        verify: str = "auto",
        auto_max_bytes: int = VERIFY_AUTO_MAX_BYTES,
    ) -> None:
        if verify not in LATENT_VERIFY_MODES:
            raise ValueError(
                f"data.verify must be one of {', '.join(LATENT_VERIFY_MODES)}, got {verify!r}"
            )
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.num_classes: int = self.manifest["num_classes"]
        c, h, _ = self.manifest["latent_shape"]
        self.channels: int = c
        self.image_size: int = h
        self.latent_shape: tuple[int, int, int] = tuple(self.manifest["latent_shape"])
        self.scale_factor: float = float(self.manifest["scale_factor"])
        self.dtype: torch.dtype = _DTYPES[self.manifest["dtype"]][0]
        counts = [s["count"] for s in self.manifest["shards"]]
        self._starts = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.long)
        # Cheap checks up front (sizes, headers: a few hundred bytes per shard) so a missing,
        # truncated or mismatched shard fails at start-up, not mid-run.
        self._layout = [self._check_layout(s) for s in self.manifest["shards"]]
        total = sum(s["bytes"] for s in self.manifest["shards"])
        self.verify = verify
        self._hash_on_read = verify == "auto" and total > auto_max_bytes
        self._open: dict[int, tuple[np.memmap, torch.Tensor]] = {}
        if verify == "always" or (verify == "auto" and not self._hash_on_read):
            self.verify_checksums()

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _check_layout(self, entry: dict[str, Any]) -> tuple[int, int, int]:
        """Size and header of one shard against the manifest -> (data start, latents, labels offsets)."""
        f = self.path / entry["file"]
        if not f.is_file():
            raise ValueError(f"shard {f} listed in {MANIFEST_NAME} is missing")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(
                f"shard {f} has {size} bytes, {MANIFEST_NAME} says {entry['bytes']} "
                f"({'truncated' if size < entry['bytes'] else 'grown'})"
            )
        header, data_start = self._read_header(f, size)
        n, (c, h, w) = entry["count"], self.latent_shape
        _, np_dtype, tag = _DTYPES[self.manifest["dtype"]]
        lat_meta = header.get("latents")
        lab_meta = header.get("labels")
        want = [n, 2, c, h, w]
        if not isinstance(lat_meta, dict) or lat_meta.get("dtype") != tag:
            raise ValueError(
                f"shard {f}: tensor 'latents' missing or not {tag} "
                f"({MANIFEST_NAME} dtype {self.manifest['dtype']}): {lat_meta}"
            )
        if lat_meta.get("shape") != want:
            raise ValueError(
                f"shard {f}: tensor 'latents' has shape {lat_meta.get('shape')}, but "
                f"{MANIFEST_NAME} (count {n}, latent_shape {list(self.latent_shape)}) says "
                f"[count, 2, C, H, W] = {want}"
            )
        if not isinstance(lab_meta, dict) or lab_meta.get("dtype") != "I64":
            raise ValueError(f"shard {f}: tensor 'labels' missing or not I64: {lab_meta}")
        if lab_meta.get("shape") != [n]:
            raise ValueError(
                f"shard {f}: tensor 'labels' has shape {lab_meta.get('shape')}, but "
                f"{MANIFEST_NAME} says count {n}"
            )
        lo, hi = lat_meta["data_offsets"]
        itemsize = np.dtype(np_dtype).itemsize
        if hi - lo != n * 2 * c * h * w * itemsize or data_start + hi > size:
            raise ValueError(f"shard {f}: 'latents' byte range {lo}..{hi} is inconsistent")
        llo, lhi = lab_meta["data_offsets"]
        if lhi - llo != 8 * n or data_start + lhi > size:
            raise ValueError(f"shard {f}: 'labels' byte range {llo}..{lhi} is inconsistent")
        return data_start, lo, llo

    def verify_checksum(self, shard_id: int) -> None:
        """Hash shard ``shard_id`` against the manifest; ValueError names the shard and both digests."""
        entry = self.manifest["shards"][shard_id]
        f = self.path / entry["file"]
        digest = sha256_file(f)
        if digest != entry["sha256"]:
            raise ValueError(
                f"shard {f} (shard {shard_id + 1} of {len(self.manifest['shards'])}) is corrupt: "
                f"sha256 {digest} != {entry['sha256']} in {MANIFEST_NAME}"
            )

    def verify_checksums(self, jobs: int = 1) -> None:
        """Hash every shard now, ``jobs`` at a time (threads: hashlib releases the GIL on large
        reads); ValueError names the first corrupt one in manifest order, the rest are not hashed."""
        pool = ThreadPoolExecutor(max(1, jobs))
        try:
            list(pool.map(self.verify_checksum, range(len(self.manifest["shards"]))))
        finally:
            pool.shutdown(cancel_futures=True)

    def _shard(self, shard_id: int) -> tuple[np.memmap, torch.Tensor]:
        """Map shard ``shard_id`` (hashing it first if that is deferred to its first read):
        (latents memmap [n, 2, C, H, W], labels [n])."""
        if shard_id in self._open:
            return self._open[shard_id]
        entry = self.manifest["shards"][shard_id]
        f = self.path / entry["file"]
        size = f.stat().st_size if f.is_file() else -1
        if size != entry["bytes"]:
            raise ValueError(f"shard {f} has {size} bytes, {MANIFEST_NAME} says {entry['bytes']}")
        if self._hash_on_read:
            self.verify_checksum(shard_id)
        data_start, lo, llo = self._layout[shard_id]
        n, (c, h, w) = entry["count"], self.latent_shape
        np_dtype = _DTYPES[self.manifest["dtype"]][1]
        lat = np.memmap(f, dtype=np_dtype, mode="r", offset=data_start + lo, shape=(n, 2, c, h, w))
        with open(f, "rb") as fh:
            fh.seek(data_start + llo)
            labels = torch.from_numpy(np.frombuffer(fh.read(8 * n), dtype="<i8").copy())
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"shard {f}: labels outside [0, {self.num_classes}): min {int(labels.min())} "
                f"max {int(labels.max())}"
            )
        self._open[shard_id] = (lat, labels)
        return lat, labels

    @staticmethod
    def _read_header(f: Path, size: int) -> tuple[dict[str, Any], int]:
        # safetensors layout: u64 little-endian header length, JSON header, raw tensor bytes.
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError(f"shard {f}: shorter than the 8-byte safetensors prefix")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > size - 8:
                raise ValueError(f"shard {f}: header length {hlen} exceeds file size {size}")
            try:
                header = json.loads(fh.read(hlen))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"shard {f}: unreadable safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise ValueError(f"shard {f}: safetensors header is not an object")
        return header, 8 + hlen

    def verify_all(self, jobs: int = 1) -> None:
        """Hash (``jobs`` at a time) and open every shard now: checksums and labels."""
        self.verify_checksums(jobs)
        for i in range(len(self.manifest["shards"])):
            self._shard(i)

    def get_batch(
        self, indices: torch.Tensor, flip: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, C, H, W] in the stored dtype (flip=True picks the flipped copy), y [n] int64."""
        validate_batch_request(indices, flip, len(self), f"LatentShardDataset({self.path})")
        n = indices.numel()
        x = torch.empty((n, *self.latent_shape), dtype=self.dtype)
        y = torch.empty(n, dtype=torch.long)
        shard_ids = torch.searchsorted(self._starts, indices, right=True) - 1
        for sid in torch.unique(shard_ids).tolist():
            rows = (shard_ids == sid).nonzero().squeeze(1)
            lat, labels = self._shard(sid)
            local = (indices[rows] - self._starts[sid]).numpy()
            copy = flip[rows].long().numpy()
            block = torch.from_numpy(np.ascontiguousarray(lat[local, copy]))  # [k, C, H, W]
            if self.dtype == torch.bfloat16:
                block = block.view(torch.bfloat16)
            x[rows] = block
            y[rows] = labels[torch.from_numpy(local)]
        return x, y
