"""Design rules on imports: folders import downward only, and no module imports itself back.

Every ``import`` in every edgeq module counts, the lazy ones inside functions too: a lazy
import still makes the stage it names a dependency. The layers, low to high, are DESIGN.md's:
utils and the shared facts (errors, flavours, graph) -> models / data -> runtime -> training ->
export -> verify / validate / report -> cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgeq"

LAYERS = [
    ("edgeq", "edgeq.errors", "edgeq.flavours", "edgeq.graph", "edgeq.svg", "edgeq.utils"),
    ("edgeq.models", "edgeq.data"),
    ("edgeq.runtime",),
    ("edgeq.training",),
    ("edgeq.export",),
    ("edgeq.validate", "edgeq.verify", "edgeq.report"),
    ("edgeq.cli", "edgeq.cli_args"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The edgeq modules ``name`` imports, anywhere in its source."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def _layer(name: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{name} belongs to no layer: add it to LAYERS"
    return rank


def test_every_module_imports_its_own_layer_or_lower():
    upward = [f"{m} -> {dep}" for m in MODULES for dep in sorted(_imports(m)) if _layer(dep) > _layer(m)]
    assert upward == []


@pytest.mark.parametrize("source,target", [("edgeq.runtime", "edgeq.export"), ("edgeq.data", "edgeq.runtime"),
                                           ("edgeq.models", "edgeq.export"), ("edgeq.verify", "edgeq.export"),
                                           ("edgeq.models", "edgeq.runtime"), ("edgeq.runtime", "edgeq.training")])
def test_named_arrows_do_not_exist(source, target):
    bad = [f"{m} -> {d}" for m in MODULES if m.startswith(source) for d in _imports(m)
           if d == target or d.startswith(target + ".")]
    assert bad == []


def test_no_import_cycle():
    graph = {m: _imports(m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert cycles == []


def test_flavour_names_are_spelled_only_in_flavours_py():
    """No module but flavours.py keeps its own list of flavours (docstrings and help text aside)."""
    names = ("int8-ort", "int8-ov", "int8-trt")
    offenders = []
    for name, path in MODULES.items():
        if name == "edgeq.flavours":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        help_text = {id(kw.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                     for kw in n.keywords if kw.arg in ("help", "description", "epilog")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | help_text:
                if any(f in node.value for f in names) and not _is_help_text(node, tree):
                    offenders.append(f"{name}:{node.lineno}: {node.value[:60]!r}")
    assert offenders == []


def _is_help_text(node: ast.Constant, tree: ast.Module) -> bool:
    """Strings inside the CLI's EXAMPLES table, or f-string parts of help=... arguments."""
    for parent in ast.walk(tree):
        if isinstance(parent, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "EXAMPLES" for t in parent.targets):
            if any(child is node for child in ast.walk(parent.value)):
                return True
        if isinstance(parent, ast.Call):
            for kw in parent.keywords:
                if kw.arg in ("help", "description", "epilog") and any(child is node for child in ast.walk(kw.value)):
                    return True
            if getattr(parent.func, "attr", "") == "add_argument_group" and any(
                    child is node for arg in parent.args for child in ast.walk(arg)):
                return True
    return False


def test_no_file_passes_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
