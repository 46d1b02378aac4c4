"""The package's layering: foundations ← engine ← families ← evaluation ← application.

Imports inside functions count. A module's layer is given by its first name under
``diffattr`` (``diffattr.attribution.kernel`` → ``attribution`` → engine).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffattr"
LAYERS = {
    "foundations": (
        "data", "diffusion", "run", "parallel", "fsio", "errors", "seeding", "config", "quality",
        "allocator", "threads",
    ),
    "engine": ("attribution",),
    "families": ("families", "text2image"),
    "evaluation": ("evaluation",),
    "application": ("cli", "commands", "report", "plots", "serve"),
}  # fmt: skip
ORDER = list(LAYERS)


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "diffattr" or len(parts) < 2:
        return None
    return next((name for name, tops in LAYERS.items() if parts[1] in tops), None)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every diffattr module ``path`` imports, at any depth (relative imports resolved)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("diffattr")}


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if m != "diffattr" and layer_of(m) is None)
    assert not unplaced, f"modules in no layer: {unplaced}"


def test_no_module_imports_a_later_layer():
    known = modules()
    upward = []
    for name, path in known.items():
        own = layer_of(name)
        if own is None:
            continue
        for target in imports(path):
            if target not in known:
                continue  # a name imported from a module, counted as the module itself
            other = layer_of(target)
            if other is not None and ORDER.index(other) > ORDER.index(own):
                upward.append(f"{name} ({own}) imports {target} ({other})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    known = modules()
    graph = {m: {t for t in imports(p) if t in known and t != m} for m, p in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


#: Where a method's or a family's name may decide what code does: their registries.
REGISTRIES = ("attribution/methods/__init__.py", "families/")


@pytest.mark.parametrize(
    "pattern",
    [r"method ==", r"method in \(", r"family ==", r"family !=", r"TEXT2IMAGE\b.*[=!]="],
)
def test_no_branch_on_a_method_or_family_name_outside_the_registries(pattern):
    hits = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(REGISTRIES):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                hits.append(f"{rel}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_only_the_families_build_attributors():
    """Commands and evaluation score through the bound run (families/bound.py), the one
    scoring service: no module outside families/ calls ``.attributor(`` or builds one."""
    hits = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(("families/", "attribution/")):
            continue  # the service itself; the engine's own member scorers
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.attributor\(|\bAttributor\(", line):
                hits.append(f"{rel}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
