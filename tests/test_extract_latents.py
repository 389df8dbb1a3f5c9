"""Latent extraction end to end with a tiny random AutoencoderKL (no download) on generated images:
shards + manifest readable by LatentShardDataset, flipped copy, resume without re-encoding, torchrun
with 2 ranks giving the same bytes, bad input (no images, unreadable image, missing VAE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmoe_dist.data.latents import LatentShardDataset
from diffmoe_dist.latents_extract import ExtractOptions, center_crop_arr, extract

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "extract_latents.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def make_folder(root: Path, per_class: int = 5, classes: int = 2, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(34, 80)), int(rng.integers(34, 80))  # non-square, not 32
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffmoe_dist.vae import make_tiny_vae

    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def run_tool(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run(
        [*launcher, str(TOOL), "--no-progress", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )


OPTS = ExtractOptions(image_size=32, shard_size=4, batch_size=3, posterior="mean")


def test_center_crop_is_adm_style() -> None:
    from PIL import Image

    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, 140:160] = 255  # a bar in the middle survives the crop; the sides are cut
    out = center_crop_arr(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3)
    assert out[:, 16].min() > 200 and out[:, 0].max() < 30


def test_extract_end_to_end_and_resume(tmp_path: Path, tiny_vae: Path) -> None:
    from diffmoe_dist.latents_extract import load_image
    from diffmoe_dist.vae import encode, load_vae

    images = make_folder(tmp_path / "imgs")
    out = tmp_path / "lat"
    summary = extract(images, out, tiny_vae, OPTS, progress=False)
    assert summary["count"] == 10 and summary["shards_written"] == 3
    ds = LatentShardDataset(out)
    assert len(ds) == 10 and ds.latent_shape == (4, 16, 16) and ds.num_classes == 2
    x, y = ds.get_batch(torch.arange(10), torch.zeros(10, dtype=torch.bool))
    assert y.tolist() == [0] * 5 + [1] * 5
    # Independent check of sample 7: crop, encode (posterior mean) and its flipped image.
    vae = load_vae(tiny_vae)
    files = sorted((images / "n00000001").iterdir())
    img = load_image(files[2], 32)[None]
    torch.testing.assert_close(x[7:8], encode(vae, img, posterior="mean"), atol=1e-5, rtol=1e-5)
    xf, _ = ds.get_batch(torch.tensor([7]), torch.ones(1, dtype=torch.bool))
    torch.testing.assert_close(
        xf, encode(vae, img.flip(-1), posterior="mean"), atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(xf, x[7:8])

    # Resume: lose one shard and the manifest; the rerun re-encodes only that shard.
    (out / "manifest.json").unlink()
    (out / "shard-00001.safetensors").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    summary = extract(images, out, tiny_vae, OPTS, progress=False)
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 2
    for name, mtime in before.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    x2, _ = LatentShardDataset(out).get_batch(torch.arange(10), torch.zeros(10, dtype=torch.bool))
    torch.testing.assert_close(x2, x)

    # A corrupted finished shard is re-encoded by the next run instead of being trusted.
    f = out / "shard-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert extract(images, out, tiny_vae, OPTS, progress=False)["shards_written"] == 1
    LatentShardDataset(out).verify_all()

    # Different options on the same output directory are refused, naming the plan file.
    with pytest.raises(ValueError, match="plan.json"):
        extract(images, out, tiny_vae, ExtractOptions(image_size=32, shard_size=5), progress=False)


def test_torchrun_two_ranks_same_bytes(tmp_path: Path, tiny_vae: Path) -> None:
    images = make_folder(tmp_path / "imgs")
    common = ["--images", str(images), "--vae", str(tiny_vae), "--image-size", "32"]
    common += ["--shard-size", "4", "--batch-size", "3", "--backend", "gloo"]
    r1 = run_tool(*common, "--out", str(tmp_path / "one"))
    assert r1.returncode == 0, r1.stderr
    r2 = run_tool(*common, "--out", str(tmp_path / "two"), nproc=2)
    assert r2.returncode == 0, r2.stderr
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    # posterior sampling is seeded per shard, so the layout does not change a byte
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert json.loads(r2.stdout.strip().splitlines()[-1])["shards_written"] == 3


def test_bad_input(tmp_path: Path, tiny_vae: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "n0").mkdir(parents=True)
    (empty / "n0" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=f"{empty}.*no images"):
        extract(empty, tmp_path / "o0", tiny_vae, OPTS, progress=False)

    with pytest.raises(ValueError, match="VAE directory .*missing-vae does not exist"):
        extract(empty, tmp_path / "o1", tmp_path / "missing-vae", OPTS, progress=False)
    r = run_tool(
        "--images", str(empty), "--out", str(tmp_path / "o2"), "--vae", str(tmp_path / "nv")
    )
    assert r.returncode == 2 and "nv does not exist" in r.stderr

    # An unreadable image in the last shard: the error names it, the earlier shards stay.
    images = make_folder(tmp_path / "imgs")
    bad = images / "n00000001" / "img4.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "lat"
    with pytest.raises(ValueError, match=f"cannot read image {bad}"):
        extract(images, out, tiny_vae, OPTS, progress=False)
    assert (out / "shard-00000.safetensors").is_file() and (
        out / "shard-00001.safetensors"
    ).is_file()
    assert not (out / "manifest.json").exists()
