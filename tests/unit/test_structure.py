"""The package's shape: no import cycles, and the README's Layout section matches the tree.

Both read the source as text (``ast``), nothing is imported, so they run in well under a second.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks", "model_registry", "expectations")
NAMESPACE = "damage"  # every package imports as damage.<package> (pyproject's package-dir mapping)


# ----------------------------------------------------------------------------- import cycles


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the project's packages."""
    mods = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def project_name(name: str) -> str:
    """A module path as the tree names it: the distribution's namespace prefix removed."""
    return name[len(NAMESPACE) + 1:] if name.startswith(NAMESPACE + ".") else name


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> project modules it imports anywhere in its body (function-level imports too:
    a lazy import hides a cycle from Python but not from a reader)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg_parts = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg_parts[: len(pkg_parts) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            edges[m].update(t for n in names if (t := project_name(n)) in mods and t != m)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "tasks"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from tasks.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")  # lazy and relative
    (pkg / "c.py").write_text("import tasks.a\nx = 1\n")
    (pkg / "d.py").write_text("from tasks import a\n")  # imports into the cycle, not part of it
    assert cycles(import_graph(module_files(tmp_path, ("tasks",)))) == [["tasks.a", "tasks.c", "tasks.sub.b"]]


def test_no_import_cycles():
    found = cycles(import_graph(module_files(ROOT)))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


# ----------------------------------------------------------------------------- layers


# Which packages each layer may not import (prefix match on dotted names). tasks/core is the ground floor;
# the work (tasks) sits below the registry, and both below the flows. expectations holds the suites and their
# runner only.
FORBIDDEN = {
    "tasks.core": ("tasks.", "flows", "model_registry", "expectations"),
    "tasks": ("flows", "model_registry"),
    "model_registry": ("flows",),
    "expectations": ("tasks", "flows", "model_registry"),
}
MAX_LINES = 600


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` pairs that break ``FORBIDDEN`` (tasks/core may import tasks.core itself)."""
    bad = []
    for m, targets in edges.items():
        layer = next((k for k in FORBIDDEN if m == k or m.startswith(k + ".")), None)
        if layer is None:
            continue
        for t in targets:
            if t == "tasks.core" or t.startswith("tasks.core."):
                continue
            if any(t == f.rstrip(".") or t.startswith(f if f.endswith(".") else f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{m} -> {t}")
    return sorted(bad)


def test_layer_rule_catches_a_planted_violation(tmp_path):
    for pkg in ("tasks/core", "tasks/data", "model_registry", "flows"):
        (tmp_path / pkg).mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks/core/a.py").write_text("def f():\n    from tasks.data import b\n")
    (tmp_path / "tasks/data/b.py").write_text("import model_registry.r\n")
    (tmp_path / "model_registry/r.py").write_text("from flows import x\n")
    (tmp_path / "flows/x.py").write_text("from tasks.core import a\n")
    edges = import_graph(module_files(tmp_path, ("tasks", "model_registry", "flows")))
    found = set(layer_violations(edges))
    assert {"model_registry.r -> flows.x", "tasks.core.a -> tasks.data.b", "tasks.data.b -> model_registry.r"} <= found
    assert not any(v.startswith("flows.") for v in found)  # the top layer may import anything


def test_layers_point_one_way():
    bad = layer_violations(import_graph(module_files(ROOT)))
    assert not bad, "imports against the layering (tasks/core < tasks < model_registry < flows): " + "; ".join(bad)


def test_no_private_names_imported_across_modules():
    """``from project.module import _name`` (or ``module._name``) is reading another module's internals."""
    mods = module_files(ROOT)
    offenders = []
    for f in mods.values():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and project_name(node.module or "") in mods:
                offenders += [f"{f.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, f"private names imported from other modules: {offenders}"


def test_no_source_file_over_the_line_limit():
    long = {str(f.relative_to(ROOT)): n for f in [*module_files(ROOT).values(), *(ROOT / "bench").glob("*.py")]
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"source files over {MAX_LINES} lines (split them by concern): {long}"


# ----------------------------------------------------------------------------- README layout


def layout_folders(readme: str) -> list[str]:
    """Folders named in the README's Layout block: lines ``name/  meaning`` (nested by indent)."""
    section = readme.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    folders, parents = [], []  # parents: (indent, path) of the enclosing folders
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+/)\s", line + " ")
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2).rstrip("/")
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = f"{parents[-1][1]}/{name}" if parents else name
        folders.append(path)
        parents.append((indent, path))
    return folders


def package_folders(root: Path) -> list[str]:
    """Every folder with an ``__init__.py`` under the project's packages."""
    return sorted(p.parent.relative_to(root).as_posix() for pkg in PACKAGES for p in (root / pkg).rglob("__init__.py"))


def test_layout_parser_nests_by_indent():
    readme = "x\n## Layout\n\n```\nfoo/   a\n  bar/ b\n  baz.py  c\nqux/  d\n```\n## Next\n"
    assert layout_folders(readme) == ["foo", "foo/bar", "qux"]


def test_readme_layout_matches_the_tree():
    named = layout_folders((ROOT / "README.md").read_text())
    missing = [f for f in named if not (ROOT / f).is_dir()]
    assert not missing, f"README Layout names folders that do not exist: {missing}"
    unnamed = [p for p in package_folders(ROOT) if p not in named]
    assert not unnamed, f"package folders missing from the README Layout: {unnamed}"


# ----------------------------------------------------------------------------- Prefect task wrappers


def test_prefect_tasks_are_made_in_one_place():
    """Only tasks/core/prefect_tasks.py imports Prefect's ``task``; everything else uses ``as_task``."""
    home = ROOT / "tasks" / "core" / "prefect_tasks.py"
    offenders = []
    for f in module_files(ROOT).values():
        if f == home:
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "prefect" \
                    and any(a.name in {"task", "Task"} for a in node.names):
                offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"Prefect tasks made outside tasks/core/prefect_tasks.py: {offenders}"


def test_as_task_rules():
    import pytest
    from prefect.cache_policies import NO_CACHE

    from tasks.core.prefect_tasks import RETRY_DELAYS_S, as_task

    def step(x: int) -> int:
        return x + 1

    t = as_task(step, "step", retries=2)
    assert t.fn is step and t.name == "step" and t.retries == 2
    assert t.retry_delay_seconds == list(RETRY_DELAYS_S[:2]) and t.cache_policy is NO_CACHE
    assert as_task(step, "once").retries == 0
    with pytest.raises(ValueError, match="retries must be 0..3"):
        as_task(step, "greedy", retries=4)
