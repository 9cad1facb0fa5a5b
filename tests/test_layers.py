"""The package is layered: no import runs back up the layers, and no module cycle.

Every module of ``cace_server`` is parsed with ``ast``; every import of a
``cace_server`` module counts, at module level or inside a function (those exist to
defer torch's import cost, and must still respect the layer order). The cycle check
follows the imports that run when a module is imported: module level, outside
``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "cace_server"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Top to bottom. A module may import modules of its own group and of groups on lower
# levels; groups that share a level do not import each other.
LAYERS: list[tuple[str, ...]] = [
    # entry points: the command line, and the Ray Serve application (ray_serve.py)
    ("cli", "ray_serve"),
    # server.py, and settings.py which composes the settings of every component.
    ("server",),
    ("http",),
    # frontends on the engine: i-PI connections and server-side jobs (relax, MD)
    ("ipi", "jobs"),
    # engine and train never import each other; validation (the geometry checks of
    # the frontends) and calculator (ASE, in process) build on the model.
    ("engine", "train", "validation", "calculator"),
    # capture of uncertain structures: the engine feeds it; it knows no model.
    ("capture",),
    ("model",),
    # Types and helpers every layer uses (structures, units, ...); they import nothing above.
    ("base",),
]

# Modules that are their group's only member, or that join another group by name.
GROUP_OF_MODULE: dict[str, str] = {
    PACKAGE: "base",  # the package itself: its version
    f"{PACKAGE}.settings": "server",
    f"{PACKAGE}.structures": "base",
    f"{PACKAGE}.outputs": "base",
    f"{PACKAGE}.options": "base",
    f"{PACKAGE}.units": "base",
    f"{PACKAGE}.host_memory": "base",
    f"{PACKAGE}.transcode": "base",
    f"{PACKAGE}.log_rate": "base",  # the rate limit on repeated log records
}


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    # runs when ``source`` is imported (module level, not under TYPE_CHECKING)
    at_import: bool


def module_names(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific module of ours that ``name`` refers to (None: not ours)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            # ``from pkg import sub`` names the submodule where there is one.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            names = []
        for name in names:
            target = _resolve(name, modules) if name.startswith(PACKAGE) else None
            if target is not None and target != module:
                found.append(Import(module, target, node.lineno, at_import))
        type_checking = isinstance(node, ast.If) and _is_type_checking(node.test)
        for child in ast.iter_child_nodes(node):
            deferred = (type_checking and child in node.body) or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            visit(child, at_import and not deferred)

    visit(tree, True)
    return found


def group_of(module: str) -> str:
    if module in GROUP_OF_MODULE:
        return GROUP_OF_MODULE[module]
    return module.split(".")[1]


def level_of(group: str) -> int:
    for level, groups in enumerate(LAYERS):
        if group in groups:
            return level
    raise AssertionError(f"group {group!r} is on no layer: add it to LAYERS")


def upward_imports(imports: list[Import], group: dict[str, str] | None = None) -> list[str]:
    """Imports that do not go to the module's own group or down to a lower level."""
    find = (lambda m: group[m]) if group is not None else group_of
    bad = []
    for imp in imports:
        source, target = find(imp.source), find(imp.target)
        if source != target and level_of(target) <= level_of(source):
            bad.append(f"{imp.source}:{imp.line} imports {imp.target} ({source} -> {target})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def all_imports() -> list[Import]:
    modules = module_names()
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def test_every_module_is_on_a_layer() -> None:
    for module in module_names():
        level_of(group_of(module))


def test_no_import_runs_back_up() -> None:
    imports = all_imports()
    assert len(imports) > 100  # the parser sees the package's imports
    assert upward_imports(imports) == []


def test_no_import_cycle() -> None:
    edges: dict[str, set[str]] = {}
    for imp in all_imports():
        if imp.at_import:
            edges.setdefault(imp.source, set()).add(imp.target)
    assert cycles(edges) == []


def test_engine_and_train_do_not_import_each_other() -> None:
    pairs = {(group_of(i.source), group_of(i.target)) for i in all_imports()}
    assert ("engine", "train") not in pairs and ("train", "engine") not in pairs


def test_checks_report_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """Self-test on a made-up package: one import runs up, two modules import each other."""
    fake = {
        "low": "import cace_server.high\n",  # model -> http: up
        "mid": "from cace_server import low\n\ndef f():\n    import cace_server.base_mod\n",
        "a": "from cace_server.b import x\n",
        "b": "from . import a\n",
        "high": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cace_server.a\n",
        "base_mod": "",
    }
    for name, text in fake.items():
        (tmp_path / f"{name}.py").write_text(text)
    modules = module_names(tmp_path)
    imports = [i for n, p in modules.items() for i in imports_of(n, p, modules)]
    group = {
        "cace_server.low": "model",
        "cace_server.mid": "engine",
        "cace_server.high": "http",
        "cace_server.a": "engine",
        "cace_server.b": "engine",
        "cace_server.base_mod": "base",
    }
    assert upward_imports(imports, group) == [
        "cace_server.low:1 imports cace_server.high (model -> http)"
    ]
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.at_import:
            edges.setdefault(imp.source, set()).add(imp.target)
    assert cycles(edges) == [["cace_server.a", "cace_server.b"]]
    # The function-level and TYPE_CHECKING imports are seen, but not followed for cycles.
    late = {(i.source, i.target) for i in imports if not i.at_import}
    assert late == {
        ("cace_server.mid", "cace_server.base_mod"),
        ("cace_server.high", "cace_server.a"),
    }
