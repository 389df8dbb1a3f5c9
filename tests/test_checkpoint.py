"""CheckpointManager: atomic publish, keep-k, damaged checkpoints, resharding on resume, the
objective check, and the in-process verification memo.

Trainers run in-process (world 1) or on spawned gloo ranks (tests/dist_utils.py) on configs/tiny.yaml.
References are the tensors the training processes held in memory when they saved, so every
comparison is exact: a load either restores the same bits or it is wrong.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_utils import run_distributed
from helpers_run import TINY, restored_signal_handlers

from diffmoe_dist.checkpoint import (
    CheckpointManager,
    check_compatible,
    latest_verified,
    list_checkpoints,
    manifest,
    verify_checkpoint,
)
from diffmoe_dist.config import load_config
from diffmoe_dist.models.moe import StackedExperts
from diffmoe_dist.parallel.distributed import DistInfo
from diffmoe_dist.trainer.trainer import Trainer

CPU = torch.device("cpu")


def make_trainer(run_dir: Path, *overrides: str, rank: int = 0, world: int = 1) -> Trainer:
    cfg = load_config(TINY, [f"run.dir={run_dir}", "run.progress=false", *overrides])
    info = DistInfo(rank, world, 0, CPU, "gloo" if world > 1 else "")
    with restored_signal_handlers():
        return Trainer(cfg, info)


def live_state(t: Trainer) -> dict[str, torch.Tensor]:
    """What the process holds: model and EMA parameters + buffers (thresholds), AdamW state.

    Read straight from the modules and the optimizer (not through checkpoint/state.py's key mapping);
    stacked expert tensors stay stacked, [local experts, ...].
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, m in (("model.", t.model), ("ema.", t.ema)):
        for name, v in [*m.named_parameters(), *m.named_buffers()]:
            out[prefix + name] = v.detach().clone()
    for name, p in t.model.named_parameters():
        for k, v in t.optimizer.state[p].items():
            out[f"optim.{name}.{k}"] = v.detach().clone()
    return out


def expert_names(t: Trainer) -> set[str]:
    """Names (in live_state) of the stacked expert tensors, whose dim 0 is the local expert."""
    stacked = {
        f"{n}.{p}"
        for n, m in t.model.named_modules()
        if isinstance(m, StackedExperts)
        for p, _ in m.named_parameters(recurse=False)
    }
    out = set()
    for key in live_state(t):
        for s in stacked:
            if key in (f"model.{s}", f"ema.{s}") or key.startswith(f"optim.{s}.exp_avg"):
                out.add(key)
    return out


def train_and_save(t: Trainer, steps: int) -> None:
    for _ in range(steps):
        t.train_step()
        t.save()


# ----------------------------------------------------------------------------------------------------
# atomic publish, keep k


def test_keep_latest_k_and_stale_tmp_ignored_and_cleaned(tmp_path: Path) -> None:
    t = make_trainer(tmp_path, "train.keep_checkpoints=2")
    train_and_save(t, 4)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000004", "step-00000003"]
    # a save that died half-way (newer step, even with a manifest) is never picked up ...
    stale = root / ".tmp-step-00000009"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    (stale / "__0_0.distcp").write_bytes(b"half")
    assert t.ckpt.latest_valid() == root / "step-00000004"
    # ... readers leave it alone (it could be a live trainer's save in progress) ...
    assert latest_verified(root) == root / "step-00000004" and stale.exists()
    CheckpointManager(tmp_path, t.cfg, 0, 1, None, keep=2)
    assert stale.exists()
    # ... and the next trainer start (which holds the run) removes it
    t.close()
    make_trainer(tmp_path, "train.keep_checkpoints=2")
    assert not stale.exists()


def test_crash_during_save_leaves_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = make_trainer(tmp_path)
    train_and_save(t, 1)
    real_save = dcp.save

    def dying_save(*args, **kwargs):
        real_save(*args, **kwargs)  # the shard is written, the process dies before publishing
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(dcp, "save", dying_save)
    t.train_step()
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.save()
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001"]
    assert t.ckpt.latest_valid() == root / "step-00000001"
    t.close()  # the first trainer "died": the run directory is free again
    t2 = make_trainer(tmp_path)
    assert t2.step == 1 and not list(root.glob(".tmp-*"))


# ----------------------------------------------------------------------------------------------------
# damaged latest checkpoint: detected, previous good one used, warning names the file


@pytest.mark.parametrize("damage", ["truncate", "flip-byte"])
@pytest.mark.parametrize("victim", ["__0_0.distcp", ".metadata"])
def test_damaged_latest_falls_back_to_previous(tmp_path: Path, damage: str, victim: str) -> None:
    t = make_trainer(tmp_path)
    t.train_step()
    t.save()
    saved_at_1 = live_state(t)
    t.train_step()
    t.save()
    f = tmp_path / "checkpoints" / "step-00000002" / victim
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    t.close()
    with pytest.warns(UserWarning, match=re.escape(str(f))):
        t2 = make_trainer(tmp_path)
    assert t2.step == 1
    got = live_state(t2)
    assert got.keys() == saved_at_1.keys()
    bad = [k for k in got if not torch.equal(got[k], saved_at_1[k])]
    assert not bad, f"restored state differs from step 1's: {bad[:5]}"


# ----------------------------------------------------------------------------------------------------
# reshard on resume: world 2 / ep 2 -> world 4 / ep 4 and world 1 / ep 1


def _as_bytes(state: dict[str, torch.Tensor]) -> bytes:
    # Tensors sent through run_distributed's torch.multiprocessing queue travel as shared-memory fds
    # that vanish when the worker exits first (FileNotFoundError in the parent): send bytes instead.
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _from_bytes(results: list[dict]) -> list[dict]:
    return [{**r, "state": torch.load(io.BytesIO(r["state"]))} for r in results]


def _save_world2(rank: int, world_size: int, run_dir: str, ep: int) -> dict:
    t = make_trainer(Path(run_dir), f"parallel.ep={ep}", rank=rank, world=world_size)
    train_and_save(t, 3)  # thresholds, EMA and AdamW moments all away from their init
    state = _as_bytes(live_state(t))
    return {"ep_rank": t.ps.ep_rank, "state": state, "experts": sorted(expert_names(t))}


def _load_world(rank: int, world_size: int, run_dir: str, ep: int) -> dict:
    t = make_trainer(Path(run_dir), f"parallel.ep={ep}", rank=rank, world=world_size)
    return {"step": t.step, "ep_rank": t.ps.ep_rank, "state": _as_bytes(live_state(t))}


def _full(results: list[dict], experts: set[str]) -> dict[str, torch.Tensor]:
    """Gather per-rank states into full tensors: experts concatenated in ep_rank order (each ep
    rank once), dense tensors required to be identical on every rank."""
    by_ep = {r["ep_rank"]: r["state"] for r in results}
    ep_ranks = sorted(by_ep)
    full: dict[str, torch.Tensor] = {}
    for key in results[0]["state"]:
        if key in experts:
            full[key] = torch.cat([by_ep[e][key] for e in ep_ranks])
        else:
            for r in results[1:]:
                assert torch.equal(r["state"][key], results[0]["state"][key]), key
            full[key] = results[0]["state"][key]
    return full


def test_reshard_on_resume(tmp_path: Path) -> None:
    save_ep = 2
    saved_dir = tmp_path / "saved"
    saved = _from_bytes(
        run_distributed(_save_world2, 2, args=(str(saved_dir), save_ep), timeout_s=300)
    )
    experts = set(saved[0]["experts"])
    assert experts, "no stacked expert tensors found"
    ref = _full(saved, experts)
    assert any("thresholds" in k for k in ref) and any(k.endswith("exp_avg_sq") for k in ref)

    for world, ep in ((4, 4), (1, 1)):
        d = tmp_path / f"w{world}"
        shutil.copytree(saved_dir, d)
        if world == 1:
            res = _from_bytes([_load_world(0, 1, str(d), ep)])
        else:
            res = _from_bytes(run_distributed(_load_world, world, args=(str(d), ep), timeout_s=300))
        assert all(r["step"] == 3 for r in res)
        assert sorted(r["ep_rank"] for r in res) == sorted(r % ep for r in range(world))
        for r in res:  # each rank holds only its slice: E / ep experts
            for key in experts:
                assert r["state"][key].shape[0] == ref[key].shape[0] // ep, key
        got = _full(res, experts)
        assert got.keys() == ref.keys()
        bad = [k for k in ref if not torch.equal(got[k], ref[k])]
        assert not bad, f"world {world} / ep {ep}: {len(bad)} tensors differ, e.g. {bad[:5]}"


# ----------------------------------------------------------------------------------------------------
# refused before any tensor: another objective


def test_objective_mismatch_is_refused_naming_both(tmp_path: Path) -> None:
    """A DDPM run resumed (or loaded) as flow, and a flow run as DDPM: refused at start-up with the
    key and both values, not later with a shape mismatch (DDPM's model predicts 2x channels)."""
    ddpm = ("objective=ddpm", "sample.sampler=ddpm")
    t = make_trainer(tmp_path / "ddpm", *ddpm)
    train_and_save(t, 1)
    t.close()
    with pytest.raises(ValueError, match=r"objective='ddpm'.*objective='flow'"):
        make_trainer(tmp_path / "ddpm")  # the config says flow (the default)
    t = make_trainer(tmp_path / "flow")
    train_and_save(t, 1)
    t.close()
    flow_ckpt = latest_verified(tmp_path / "flow" / "checkpoints")
    cfg = load_config(TINY, [f"run.dir={tmp_path / 'flow'}", *ddpm])
    with pytest.raises(ValueError, match=r"objective='flow'.*objective='ddpm'"):
        check_compatible(flow_ckpt, cfg)


# ----------------------------------------------------------------------------------------------------
# verification memo: a file hashed once per process, a changed file hashed again


def test_verify_hashes_once_per_process_and_sees_any_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(TINY, [f"run.dir={tmp_path}"])
    torch.manual_seed(0)
    path = CheckpointManager(tmp_path, cfg, 0, 1, None).save(1, torch.nn.Linear(64, 64), None, None)
    files = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    hashed: list[str] = []
    real = manifest.sha256_file

    def counting(f: Path) -> str:
        hashed.append(Path(f).name)
        return real(f)

    monkeypatch.setattr(manifest, "sha256_file", counting)
    assert verify_checkpoint(path) is None
    assert sorted(hashed) == files  # just written (within RACY_S): hashed, not memoized
    time.sleep(manifest.RACY_S + 0.1)
    hashed.clear()
    assert verify_checkpoint(path) is None and sorted(hashed) == files
    hashed.clear()
    assert verify_checkpoint(path) is None and hashed == []  # every file memoized
    # one byte flipped in place, size and mtime put back: the kernel's ctime still moves
    victim = path / "__0_0.distcp"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    problem = verify_checkpoint(path)
    assert problem is not None and "__0_0.distcp" in problem and "sha256" in problem
    assert hashed == ["__0_0.distcp"]
