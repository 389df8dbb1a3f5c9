"""The package's architecture, as rules a change can break (DESIGN.md sections 3 and 4).

Read from the source with ``ast`` (nothing is imported), so a rule names the file and the line:

- the top level of ``diffmoe_dist/`` holds the entry points and the few modules every layer shares;
- no import cycle between modules, lazy (function-level) imports included (``if TYPE_CHECKING:``
  imports, for annotations only, are not imports at run time);
- a batch flows one way: data -> trainer -> model (-> dispatcher -> back) -> loss -> trainer ->
  checkpoint/metrics, so each folder has folders it never imports (``FORBIDDEN``);
- ``tools/*.py`` are shells over the package: their logic is importable and tested there.

Each choice list defined once: tests/test_config.py::test_each_choice_list_is_written_once.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "diffmoe_dist"

ENTRY_POINTS = {"train", "sample", "evaluate", "demo"}
# Shared by every layer: the config tree, the checkpoint format, MoE telemetry, atomic file writes.
SHARED = {"config", "checkpoint", "telemetry", "fsutil"}
FOLDERS = {
    "models",
    "transport",
    "parallel",
    "trainer",
    "data",
    "inference",
    "quality",
    "studies",
    "bench",
    "planner",
}

_ABOVE_MODEL = {"trainer", "inference", "studies", "bench", "planner"}
# Group -> groups it must never import. A group is a folder or a top-level module of diffmoe_dist.
FORBIDDEN: dict[str, set[str]] = {
    # The model as if there were one device (DESIGN 3): no ranks, no data, no loop.
    "models": _ABOVE_MODEL | {"parallel", "data", "checkpoint", "telemetry", "quality"},
    # The objective never knows the model or where it runs.
    "transport": _ABOVE_MODEL | {"models", "parallel", "data", "checkpoint", "telemetry"},
    "data": _ABOVE_MODEL | {"models", "transport", "checkpoint", "telemetry", "quality"},
    "parallel": _ABOVE_MODEL | {"data", "checkpoint", "quality"},
    "checkpoint": _ABOVE_MODEL | {"data", "quality"},
    "telemetry": _ABOVE_MODEL | {"data", "checkpoint", "quality"},
    "quality": _ABOVE_MODEL | {"parallel", "models", "checkpoint", "telemetry"},
    "trainer": {"inference", "studies", "bench", "planner", "quality"},
    "inference": {"trainer", "studies", "bench", "planner"},
    "bench": {"studies", "inference", "planner"},
    "planner": {"trainer", "inference", "studies"},
    "studies": set(),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, except those under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(mods: dict[str, Path]) -> dict[str, list[tuple[str, int]]]:
    """module -> [(imported diffmoe_dist module, line)], lazy (function-level) imports included."""
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for mod, path in mods.items():
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")
                    if path.name != "__init__.py":
                        base = base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                names = [name] + [
                    f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in mods
                ]
            for name in names:
                if name.split(".")[0] != "diffmoe_dist":
                    continue
                while name not in mods and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name != mod:
                    out[mod].append((name, node.lineno))
    return out


def _group(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "(package)"


def test_top_level_holds_entry_points_and_shared_modules() -> None:
    allowed = ENTRY_POINTS | SHARED | {"__init__"}
    top = {p.stem for p in PKG.glob("*.py")}
    assert top <= allowed, (
        f"modules at the top of diffmoe_dist/ that belong in a folder: {sorted(top - allowed)}"
    )
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    # checkpoint may be a package of its own (format, manager).
    assert folders - {"checkpoint"} <= FOLDERS, (
        f"folders not in the layout of DESIGN.md: {sorted(folders - FOLDERS)}"
    )


def test_no_import_cycles() -> None:
    mods = _modules()
    graph = {m: {t for t, _ in edges} for m, edges in _imports(mods).items()}
    # Tarjan's strongly connected components, iterative (no recursion limit to meet).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root in mods:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    cycles.append(sorted(comp))
    assert not cycles, f"import cycles (lazy imports count): {cycles}"


def test_data_flows_one_way() -> None:
    mods = _modules()
    bad = []
    for mod, edges in _imports(mods).items():
        src = _group(mod)
        for target, line in edges:
            dst = _group(target)
            if dst == src:
                continue
            rel = mods[mod].relative_to(REPO)
            if dst in ENTRY_POINTS and src not in ENTRY_POINTS:
                bad.append(
                    f"{rel}:{line} imports the entry point {target} (entry points are thin; import the library)"
                )
            elif dst in FORBIDDEN.get(src, set()):
                bad.append(f"{rel}:{line}: {src} must not import {dst} ({target})")
    assert not bad, "\n".join(bad)


def test_models_never_touch_torch_distributed() -> None:
    bad = []
    for path in (PKG / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                if any(n.startswith("torch.distributed") for n in names):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
            elif isinstance(node, ast.Attribute) and node.attr == "distributed":
                if isinstance(node.value, ast.Name) and node.value.id == "torch":
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, f"models/ is the model as if there were one device (DESIGN 3): {bad}"


# A tool's own code: argument defaults that point into the repository, a call to the package's main.
TOOL_MAX_LINES = 40


def test_tools_are_shells_over_the_package() -> None:
    fat = []
    for path in sorted((REPO / "tools").glob("*.py")):
        tree = ast.parse(path.read_text())
        defs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        code_lines = [
            ln
            for ln in path.read_text().splitlines()
            if ln.strip() and not ln.strip().startswith("#")
        ]
        uses_pkg = any(
            isinstance(n, ast.ImportFrom) and (n.module or "").startswith("diffmoe_dist")
            for n in ast.walk(tree)
        )
        if not uses_pkg or len(code_lines) > TOOL_MAX_LINES or len(defs) > 1:
            fat.append(
                f"{path.name}: {len(code_lines)} lines, defines {defs}, imports diffmoe_dist: {uses_pkg}"
            )
    assert not fat, (
        "tools/*.py must be thin shells (logic in diffmoe_dist/, tested there):\n" + "\n".join(fat)
    )


def test_readme_map_points_at_files_that_exist() -> None:
    """README "Where things are": every file named in the table exists (a bare name is in the folder of
    the last path named before it in the same row)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    rows = [
        ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| ---")
    ][1:]
    assert len(rows) >= 20, "the map lost its rows"
    missing = []
    for row in rows:
        folder = ""
        for token in re.findall(r"`([\w/.]+)`", row.split("|")[2]):
            if not (token.endswith(".py") or token.endswith("/")):
                continue
            if "/" in token.rstrip("/"):
                folder = token.rsplit("/", 1)[0] + "/" if token.endswith(".py") else token
                path = PKG / token
            elif token.endswith("/"):
                folder, path = token, PKG / token
            else:
                path = PKG / folder / token
            if not path.exists():
                missing.append(f"{token} -> {path.relative_to(REPO)}")
    assert not missing, f"README map names files that do not exist: {missing}"
