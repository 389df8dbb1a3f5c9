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

from diffmoe_dist.data.extract import ExtractOptions, center_crop_arr, extract
from diffmoe_dist.data.latents import LatentShardDataset

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
    from diffmoe_dist.data.vae import make_tiny_vae

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
    from diffmoe_dist.data.extract import load_image
    from diffmoe_dist.data.vae import encode, load_vae

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


def test_torchrun_two_ranks_same_latents(tmp_path: Path, tiny_vae: Path) -> None:
    images = make_folder(tmp_path / "imgs")
    common = ["--images", str(images), "--vae", str(tiny_vae), "--image-size", "32"]
    common += ["--shard-size", "4", "--batch-size", "3", "--backend", "gloo"]
    opts = ExtractOptions(image_size=32, shard_size=4, batch_size=3)  # the CLI's defaults otherwise
    extract(images, tmp_path / "one", tiny_vae, opts, progress=False)
    r2 = run_tool(*common, "--out", str(tmp_path / "two"), nproc=2)
    assert r2.returncode == 0, r2.stderr
    # Posterior sampling is seeded per shard, so the layout does not change a value. (Not compared:
    # file hashes; safetensors writes its metadata map in a per-process order.)
    one, two = LatentShardDataset(tmp_path / "one"), LatentShardDataset(tmp_path / "two")
    for flip in (False, True):
        f = torch.full((10,), flip)
        x1, y1 = one.get_batch(torch.arange(10), f)
        x2, y2 = two.get_batch(torch.arange(10), f)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
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


def _module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_latents_train_sample_resume_eval(tmp_path: Path, tiny_vae: Path) -> None:
    """Folder -> latents -> 2 training steps -> diffmoe-sample --vae (resumed after losing a part)
    -> diffmoe-eval FID on a random Inception (plumbing)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers_run import run_train

    lat = tmp_path / "lat"
    extract(make_folder(tmp_path / "imgs"), lat, tiny_vae, OPTS, progress=False)
    run = tmp_path / "run"
    run_train(
        run, "train.steps=2", "data.name=latents", f"data.path={lat}", "model.in_channels=4",
        "model.num_classes=2",
    ).check()  # fmt: skip
    fast = ["--set", "sample.num_samples=6", "--set", "sample.batch_size=2"]
    fast += ["--set", "sample.num_steps=3"]
    out = tmp_path / "samples"
    sample = ["diffmoe_dist.sample", "--run-dir", str(run), "--out", str(out), "--npz", *fast]

    res = _module(*sample)
    assert res.returncode == 2 and "pass --vae DIR" in res.stderr
    from diffmoe_dist.data.vae import load_vae

    with pytest.raises(ValueError, match="no-vae does not exist"):
        load_vae(tmp_path / "no-vae")

    res = _module(*sample, "--vae", str(tiny_vae), "--keep-parts")
    assert res.returncode == 0, res.stderr[-3000:]
    first = np.load(out / "samples.npz")["arr_0"]
    assert first.shape == (6, 32, 32, 3) and first.dtype == np.uint8
    assert (out / "grid.png").is_file() and len(list((out / "parts").glob("part-*.npz"))) == 3
    report = json.loads((out / "sample_report.json").read_text())
    # A rerun with other settings into these parts is refused, naming run.json.
    res = _module(*sample, "--vae", str(tiny_vae), "--set", "sample.cfg_scale=2")
    assert res.returncode == 2 and "run.json" in res.stderr and "cfg_scale" in res.stderr

    # An interrupted run: one batch lost. The rerun samples only those 2 and gives the same set.
    (out / "parts" / "part-00000002-r0000.npz").unlink()
    (out / "samples.npz").unlink()
    res = _module(*sample, "--vae", str(tiny_vae))
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((out / "sample_report.json").read_text())
    assert again["resumed_samples"] == 4 and again["c_infer"] == pytest.approx(report["c_infer"])
    np.testing.assert_array_equal(np.load(out / "samples.npz")["arr_0"], first)
    assert not (out / "parts").exists()  # removed once complete (no --keep-parts)

    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    ev = ["diffmoe_dist.evaluate", "--run-dir", str(run), *fast, "--json"]
    from diffmoe_dist.inference import evaluate_checkpoint

    with pytest.raises(ValueError, match="give --ref FILE.npz and --inception"):
        evaluate_checkpoint(str(run), None, [], str(tiny_vae))
    res = _module(*ev, "--vae", str(tiny_vae), "--ref", str(ref), "--inception", "random")
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert np.isfinite(result["fid"]) and 0 <= result["precision"] <= 1
    assert result["num_eval_samples"] == 6 and result["c_infer"] == pytest.approx(report["c_infer"])
