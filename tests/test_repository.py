"""The repository stands on its own and its packages are layered.

* No tracked file points to a document outside the repository or to an issue tracker's numbers: sources are
  cited themselves (paper, project file and version, an upstream link) or an in-repository document.
* The import graph of ``scaling`` (every import, also those inside functions) has no cycle between modules, and
  each package imports only the packages below it (``ALLOWED``), so a newcomer can read the layers bottom-up.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Pointers to files that live beside the repository (never shipped with it) or to numbered tracker items.
OUTSIDE = re.compile(
    r"(?:DESIGN|performance|platform|anchors|bit_and_seed)\.md|reference/datasets\.md|anchors §|"  # forbidden pattern
    r"\.\./shared/reference|shared/reference/|§ ?[0-9]+ of the reference|[Ii]ssue [0-9]+(?: point| §|,|\)|:)"
)

# package -> the scaling packages it may import (besides itself). Bottom: io, config. Top: study.
ALLOWED = {
    "io": set(),
    "config": {"io"},
    "data": {"io", "config"},
    "metrics": {"io", "config"},
    "models": {"io", "config"},
    "demo": {"io", "config", "data"},
    "tracking": {"io", "config"},
    "engine": {"io", "config", "models", "data"},
    "analysis": {"io", "config", "data", "models", "metrics", "engine"},
    "study": {"io", "config", "data", "metrics", "models", "demo", "tracking", "engine", "analysis"},
}


def test_no_file_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        if name == "tests/test_repository.py":
            continue  # holds the pattern itself
        try:
            text = (REPO / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{name}:{i}: {line.strip()[:120]}")
    assert not hits, "lines pointing outside the repository:\n" + "\n".join(hits)


def test_the_outside_pattern_catches_what_it_is_for():
    forbidden = ("see DESIGN.md", "(anchors §3.1)", "performance.md §6", "issue 3 point 2", "(issue 12)",
                 "../shared/reference/datasets.md")  # forbidden pattern examples
    for bad in forbidden:
        assert OUTSIDE.search(bad), bad
    for fine in ("https://github.com/pytorch/pytorch/issues/109385", "docs/design.md", "DataError"):
        assert not OUTSIDE.search(fine), fine


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> scaling modules it imports`` (module-level and function-level imports alike)."""
    files = {_module_name(p): p for p in (REPO / "scaling").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = set()
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                # `from scaling.x import y` names the submodule scaling.x.y when there is one
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            deps |= {n for n in names if n in files and n != mod}
        graph[mod] = deps
    return graph


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_packages_import_only_the_layers_below_them():
    graph = import_graph()
    assert {_package(m) for m in graph} - {""} <= set(ALLOWED), "a new package needs its row in ALLOWED"
    bad = [f"{m} imports {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
           if _package(m) and _package(d) and _package(d) != _package(m)
           and _package(d) not in ALLOWED[_package(m)]]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph = import_graph()
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_study_package_names_and_exports_its_entry_points():
    import scaling
    import scaling.study as study
    from scaling.study import aggregate, report, runner, store

    assert (study.run_study, study.plan, study.RunStore) == (runner.run_study, runner.plan, store.RunStore)
    assert (study.load_study, study.build_report) == (aggregate.load_study, report.build_report)
    assert all(getattr(study, name) is not None for name in study.__all__)
    for name in ("run_study", "plan", "RunStore", "load_study", "build_report"):
        assert name in study.__doc__ and name in scaling.__doc__
