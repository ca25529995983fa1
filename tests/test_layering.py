"""The layers of the code, read from the source (every module's imports, parsed with ast): ``passes``
never imports ``graphrepair``; ``graphrepair.io`` never imports ``graphrepair.distributed``; nothing
outside ``graphrepair.cli`` imports ``graphrepair.cli``; the modules' top-level imports form no cycle.

Imports inside functions count for the first three rules (a lazy import still runs up a layer);
the module-level ones (``if TYPE_CHECKING:`` blocks included: a circle of names is a circle in the
design even where it never runs) count for the last.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("graphrepair", "passes")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(base: str, names: list[str]) -> list[str]:
    """What ``from base import a, b`` imports: the submodules ``base.a`` where they exist, else ``base``."""
    out = []
    for name in names:
        sub = f"{base}.{name}"
        out.append(sub if sub in MODULES else base)
    return out


def _type_checking(test: ast.AST) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str, top_level_only: bool = False) -> set[str]:
    """The modules ``module`` imports (of any package, by full name)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            visit_one(child, top)

    def visit_one(child: ast.AST, top: bool) -> None:
        if isinstance(child, ast.Import):
            if top or not top_level_only:
                found.update(a.name for a in child.names)
        elif isinstance(child, ast.ImportFrom):
            if top or not top_level_only:
                base = _resolve(module, path, child)
                found.update(_targets(base, [a.name for a in child.names]))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(child, False)
        elif isinstance(child, ast.If) and _type_checking(child.test):
            visit(child, False)  # ``if TYPE_CHECKING:``: read by type checkers, never run
        else:
            visit(child, top)  # class bodies, if/try/with blocks at module level run on import

    visit(tree, True)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _offenders(source: str, target: str, exempt: str | None = None) -> list[str]:
    return sorted(f"{m} imports {t}" for m in MODULES if _within(m, source) and not (exempt and _within(m, exempt))
                  for t in imports(m) if _within(t, target))


def test_the_modules_are_found():
    assert {"graphrepair.cli.merge", "graphrepair.io.fileio", "passes.export_onnx", "graphrepair"} <= set(MODULES)
    assert "graphrepair.io.fileio" in imports("graphrepair.io.export")  # the parse sees imports


def test_passes_never_imports_graphrepair():
    assert _offenders("passes", "graphrepair") == []


def test_io_never_imports_distributed():
    assert _offenders("graphrepair.io", "graphrepair.distributed") == []


def test_only_the_cli_imports_the_cli():
    offenders = _offenders("graphrepair", "graphrepair.cli", exempt="graphrepair.cli")
    # graphrepair/__main__.py is the command line's own entry point (python -m graphrepair)
    assert [o for o in offenders if not o.startswith("graphrepair.__main__ ")] == []


def _cycles() -> list[list[str]]:
    graph = {m: sorted(t for t in imports(m, top_level_only=True) if t in MODULES and t != m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    return found


def test_no_import_cycle():
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    """The rules above can fail: a planted cycle and a planted upward import are found."""
    real = imports

    def planted(module: str, top_level_only: bool = False) -> set[str]:
        extra = {"graphrepair.io.fileio": {"graphrepair.io.export", "graphrepair.distributed"},
                 "passes.base": {"graphrepair.errors"}}.get(module, set())
        return real(module, top_level_only) | extra

    monkeypatch.setitem(globals(), "imports", planted)
    assert any({"graphrepair.io.fileio", "graphrepair.io.export"} <= set(c) for c in _cycles())
    assert "graphrepair.io.fileio imports graphrepair.distributed" in _offenders("graphrepair.io",
                                                                               "graphrepair.distributed")
    assert _offenders("passes", "graphrepair") == ["passes.base imports graphrepair.errors"]
