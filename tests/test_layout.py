"""The package's layout rules, checked on its source with ``ast`` (README, "Layout"):

- no import cycles among spectra's modules, counting imports inside functions too (a late import
  that dodges a cycle is still a cycle);
- no module imports a private (``_name``) of another module;
- matplotlib only under ``spectra/plots/``; click and rich only under ``cli/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for spectra/ and cli/ (installed as ``spectra_cli``)."""
    out = {}
    for pkg, folder in (("spectra", ROOT / "spectra"), ("spectra_cli", ROOT / "cli")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _imports(path: Path, known: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """``(module imported, name imported from it or None, line)`` for every import of ours in ``path``."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never executed, so never part of a cycle
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] in ("spectra", "spectra_cli")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in ("spectra", "spectra_cli"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                # `from spectra import plots` imports a module; `from spectra.x import f` a name of x
                found.append((sub, None, node.lineno) if sub in known else (node.module, a.name, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        for target, _, _ in _imports(path, known):
            # importing a.b.c runs a/__init__ and a/b/__init__ too, but the package root's __init__
            # (the public surface) is only an edge when it is imported itself
            if target in known and target != mod:
                graph[mod].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_detector_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_names_imported_across_modules():
    known = _modules()
    bad = []
    for mod, path in known.items():
        for target, name, line in _imports(path, known):
            if name is not None and name.startswith("_") and not name.startswith("__") and target != mod:
                bad.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {name}")
    for path in sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "bench").glob("*.py")):
        for target, name, line in _imports(path, known):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {name}")
    assert bad == []


def test_heavy_ui_libraries_stay_in_their_layers():
    bad = []
    for mod, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for n in names:
                top = n.split(".")[0]
                if top == "matplotlib" and not mod.startswith("spectra.plots"):
                    bad.append(f"{mod} imports matplotlib")
                if top in ("click", "rich") and not mod.startswith("spectra_cli"):
                    bad.append(f"{mod} imports {top}")
    assert bad == []
