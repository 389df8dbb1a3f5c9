"""tools/reproduce_routing.py at a tiny size: 1 seed, 3 steps, Dense and DiffMoE, 2 runs at a time.

Checks that the table, the orderings and the plot are written, that every number in the table
parses, that the activated parameter counts agree (equal compute), that DiffMoE has the three
inference rules, and that hand-written text around the generated section survives a rerun (which
reuses the finished runs instead of training again).
"""

from __future__ import annotations

import ast
import math
import re
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from diffmoe_dist.studies.reproduce_routing import RoutingSpec, main, run_study
from diffmoe_dist.studies.routing_report import markers, write_doc

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "reproduce_routing.py"
PRESET = REPO / "configs" / "reproduce_routing.yaml"
TINY = [
    "--seeds", "1", "--steps", "3", "--modes", "dense,diffmoe",
    "--set", "model.depth=2", "--set", "model.hidden_size=32",
    "--set", "moe.pool_samples=16", "--set", "train.global_batch_size=16",
    "--num-samples", "20", "--sample-steps", "2", "--heldout-samples", "32",
    "--experts", "4,8",  # the expert sweep: E = 4 next to the preset's E = 8 (8 is not repeated)
]  # fmt: skip


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The study's main() in this process (its runs are subprocesses anyway): saves a startup.
    Called as the tool calls it (test_tool_is_a_shell checks that the tool does only that)."""
    rc = main(args, root=REPO, prog="python tools/reproduce_routing.py")
    out = capsys.readouterr()
    return rc, out.out, out.err


def _table_rows(md: str) -> list[list[str]]:
    lines = md.split("| model |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.strip()]


def test_tiny_study_writes_table_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training/eval subprocesses inherit it
    out, work = tmp_path / "docs", tmp_path / "runs"
    rc, stdout, stderr = _run([*TINY, "--out", str(out), "--work-dir", str(work)], capsys)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    md = (out / "reproduction.md").read_text()
    png = out / "reproduction.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    rows = _table_rows(md)
    assert [(r[0], r[1]) for r in rows] == [
        ("Dense-DiT", "-"),
        ("DiffMoE P=16", "static top-k"),
        ("DiffMoE P=16", "dynamic (predictor)"),
        ("DiffMoE P=16", "independent"),
        ("DiffMoE E=4 P=16", "static top-k"),
        ("DiffMoE E=4 P=16", "dynamic (predictor)"),
        ("DiffMoE E=4 P=16", "independent"),
    ]
    for r in rows:
        for cell in r[2:6]:  # fd, accuracy, held-out loss, C_infer: "mean ± std"
            mean, std = (float(v) for v in cell.split("±"))
            assert math.isfinite(mean) and std == 0.0  # one seed
        assert r[6] == rows[0][6]  # activated params: equal compute
        assert float(r[8]) > 0 and r[9] == "1"
    for i in (1, 4):  # static top-k at C = 1, E = 8 and E = 4
        assert float(rows[i][5].split("±")[0]) == pytest.approx(1.0)
    assert float(rows[4][7].rstrip("M")) < float(rows[1][7].rstrip("M"))  # E=4: fewer total params
    run_cfg = yaml.safe_load((work / "diffmoe_e4" / "seed0" / "config.yaml").read_text())
    assert run_cfg["moe"]["num_experts"] == 4
    assert "python tools/reproduce_routing.py --seeds 1" in md
    assert re.search(r"torch 2\.\d+", md) and "git commit" in md
    assert "DiffMoE P=16 static top-k > Dense-DiT" in md  # the orderings table

    # Hand-written reading is kept; finished runs are reused, not retrained.
    (out / "reproduction.md").write_text("# Title\n\nMY READING\n\n" + md + "\nTAIL NOTE\n")
    rc, stdout, stderr = _run([*TINY, "--out", str(out), "--work-dir", str(work)], capsys)
    assert rc == 0, stderr[-3000:]
    assert "[train]" not in stdout and stdout.count("[reuse]") == 3
    md2 = (out / "reproduction.md").read_text()
    assert "MY READING" in md2 and "TAIL NOTE" in md2 and md2.count("## Results (generated)") == 1


def test_layout_errors_before_training(tmp_path: Path) -> None:
    """A pool that does not divide the global batch is refused while planning (nothing trains)."""
    spec = RoutingSpec(
        config=PRESET,
        modes=("diffmoe",),
        seeds=1,
        pool_sweep=(48,),
        overrides=("train.global_batch_size=64",),
        work_dir=tmp_path / "runs",
        out_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="pool_samples=48"):
        run_study(spec)
    assert not (tmp_path / "runs").exists()


def test_expert_sweep_ep_must_divide_each_count(tmp_path: Path) -> None:
    """--experts 2 with --ep 4 is refused while planning, naming the keys and numbers."""
    spec = RoutingSpec(
        config=PRESET,
        modes=("diffmoe",),
        seeds=1,
        nproc=4,
        ep=4,
        expert_sweep=(2, 4),
        overrides=("train.global_batch_size=256",),
        work_dir=tmp_path / "runs",
        out_dir=tmp_path,
    )
    with pytest.raises(ValueError, match=r"parallel.ep=4 does not divide moe.num_experts=2"):
        run_study(spec)
    assert not (tmp_path / "runs").exists()


def test_markers_keep_other_sections(tmp_path: Path) -> None:
    def section(tag: str, body: str) -> str:
        begin, end = markers(tag)
        return f"{begin}\n{body}\n{end}\n"

    doc = tmp_path / "r.md"
    write_doc(doc, section("", "MAIN v1"), "")
    write_doc(doc, section("pool", "POOL v1"), "pool")
    write_doc(doc, section("", "MAIN v2"), "")
    text = doc.read_text()
    assert "MAIN v2" in text and "MAIN v1" not in text and "POOL v1" in text
    assert text.index("MAIN v2") < text.index("POOL v1")  # replaced in place, not appended


def test_tiny_ddpm_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--objective ddpm trains DDPM models (2C outputs), evaluates with DDIM and the hybrid held-out
    loss, and writes its own section ("ddpm") next to an existing main one."""
    out, work = tmp_path / "docs", tmp_path / "runs"
    out.mkdir()
    (out / "reproduction.md").write_text(
        "# T\n\n<!-- BEGIN GENERATED by tools/reproduce_routing.py -->\nMAIN\n"
        "<!-- END GENERATED by tools/reproduce_routing.py -->\n"
    )
    args = [a for a in TINY if a not in ("--experts", "4,8")]
    args[args.index("dense,diffmoe")] = "diffmoe"
    rc, stdout, stderr = _run(
        [*args, "--objective", "ddpm", "--out", str(out), "--work-dir", str(work)], capsys
    )
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    md = (out / "reproduction.md").read_text()
    assert (
        "MAIN" in md
        and "## Results (generated: ddpm)" in md
        and (out / "reproduction_ddpm.png").is_file()
    )
    run_cfg = yaml.safe_load((work / "diffmoe" / "seed0" / "config.yaml").read_text())
    assert run_cfg["objective"] == "ddpm" and run_cfg["sample"]["sampler"] == "ddim"
    metrics = (work / "diffmoe" / "seed0" / "metrics.jsonl").read_text()
    assert '"ddpm_loss"' in metrics and '"vb"' in metrics
    rows = _table_rows(md.split("## Results (generated: ddpm)")[1])
    assert [r[1] for r in rows] == ["static top-k", "dynamic (predictor)", "independent"]
    for r in rows:
        assert math.isfinite(float(r[4].split("±")[0]))  # the hybrid held-out loss


@pytest.mark.parametrize("name", ["reproduce_routing", "scaling_study", "threshold_sweep"])
def test_study_tools_are_shells(name: str) -> None:
    """tools/<study>.py holds no logic: imports, the checkout's path, and main() of the package's
    diffmoe_dist.studies.<study> (so everything a study does is importable and tested there)."""
    tree = ast.parse((REPO / "tools" / f"{name}.py").read_text())
    imported = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module]
    package = [(n.module, [a.name for a in n.names]) for n in imported if n.module != "pathlib"]
    assert package == [(f"diffmoe_dist.studies.{name}", ["main"])]
    allowed = (ast.Expr, ast.Import, ast.ImportFrom, ast.Assign, ast.If)
    assert all(isinstance(n, allowed) for n in tree.body), ast.dump(tree)[:500]
    guard = tree.body[-1]
    assert isinstance(guard, ast.If) and "sys.exit(main(" in ast.unparse(guard)


def test_tool_refuses_bad_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shell itself, run as a script (in this process: no interpreter start-up), reports a bad
    flag as a CLI error before any work."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the shell puts its checkout first
    monkeypatch.setattr(sys, "argv", [str(TOOL), "--tag", "a b", "--work-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(TOOL), run_name="__main__")
    assert exit_.value.code == 2
    assert "--tag 'a b': letters, digits, - and _ only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
