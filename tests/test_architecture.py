"""The package's shape (docs/design.md): thin entry points at the top over packages named for what they are, no
import circle among compress_lit's modules, no module kept only to re-export another's names.

The import graph is built with ``ast`` from ``src/compress_lit``: every ``import``/``from ... import`` of a
compress_lit module, relative ones resolved, at module level (``if``/``try`` blocks at module level included).
Imports inside functions are excluded: they run on a call, after every module has loaded, so they cannot make an
import fail; they are how a module reaches optional or heavy pieces when it needs them. ``from pkg import name``
counts as an import of ``pkg.name`` when that is a module, else of ``pkg`` (its ``__init__``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "compress_lit"
ENTRY_POINTS = ("train", "pretrain", "evaluate", "linear", "detect", "export", "report", "reproduce", "cache_features")
MAX_TOP_LEVEL_MODULES = 14
MAX_ENTRY_POINT_LINES = 200


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _module_level(tree: ast.Module):
    """The statements that run on import: the module's body and the bodies of its top-level if/try/with blocks."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []) or [])
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The compress_lit modules ``name`` imports at module level."""
    tree = ast.parse(path.read_text(), str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in _module_level(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    found = {m for m in found if m in known and m != name}
    # importing a.b.c runs a/__init__ and a/b/__init__ first (those of the importing module's own packages have
    # started already: a submodule's implicit import of its package is no edge)
    own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
    for m in list(found):
        parts = m.split(".")
        found.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in known and p not in own)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def is_reexport_shim(path: Path) -> bool:
    """A module whose body (docstring aside) is only imports, ``__all__`` and ``sys.modules`` aliasing, and that
    imports something: it exists only so that an old path keeps working. A package ``__init__`` that only holds
    its docstring is not one."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]

    def plumbing(node: ast.stmt) -> bool:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return True
        if isinstance(node, ast.Assign):
            src = ast.unparse(node)
            return src.startswith("__all__") or "sys.modules" in src
        return False

    return bool(body) and any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in body) and all(map(plumbing, body))


# --------------------------------------------------------------------------------- the checks can fail
def test_the_cycle_finder_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_the_graph_resolves_relative_imports_and_leaves_function_imports_out(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text('"""doc"""\n')
    (root / "sub" / "__init__.py").write_text("")
    (root / "top.py").write_text("from .sub import low\n\n\ndef f():\n    from . import late\n")
    (root / "late.py").write_text("")
    (root / "sub" / "low.py").write_text("from .. import top\ntry:\n    from ..late import x\nexcept ImportError:\n"
                                         "    pass\n")
    graph = import_graph(root)
    assert graph["pkg.top"] == {"pkg.sub", "pkg.sub.low"}  # not pkg.late: imported inside a function
    assert graph["pkg.sub.low"] == {"pkg.top", "pkg.late"}  # the try block's import counts
    assert find_cycle(graph) in (["pkg.sub.low", "pkg.top", "pkg.sub.low"], ["pkg.top", "pkg.sub.low", "pkg.top"])


def test_the_shim_check_tells_a_shim_from_a_module(tmp_path):
    shim = tmp_path / "old.py"
    shim.write_text('"""Moved."""\nfrom .new import f, g\n\n__all__ = ["f", "g"]\n')
    alias = tmp_path / "alias.py"
    alias.write_text('"""Moved."""\nimport sys\n\nfrom . import new as _new\n\nsys.modules[__name__] = _new\n')
    real = tmp_path / "real.py"
    real.write_text('"""Work."""\nfrom .new import f\n\n\ndef h():\n    return f()\n')
    empty = tmp_path / "__init__.py"
    empty.write_text('"""A package."""\n')
    assert is_reexport_shim(shim) and is_reexport_shim(alias)
    assert not is_reexport_shim(real) and not is_reexport_shim(empty)


# ----------------------------------------------------------------------------------------- the package
def test_no_import_circle_among_compress_lit_modules():
    graph = import_graph()
    assert len(graph) > 50 and "compress_lit.runtime.config" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(n for n, p in modules().items() if p.name != "__init__.py"))
def test_no_module_only_re_exports(name):
    assert not is_reexport_shim(modules()[name]), f"{name} only re-exports names: import them from where they live"


def test_a_package_init_exports_its_own_modules_only():
    """A package ``__init__`` may name a small public API, of modules of its own package (``teachers.formats``:
    of ``teachers``): one that imports from another package would be a shim for an old path."""
    for name, path in modules().items():
        if path.name != "__init__.py":
            continue
        home = ".".join(name.split(".")[:2]) + "."
        outside = {m for m in imports_of(name, path, set(modules())) if not m.startswith(home)}
        assert not outside, f"{name} (its __init__) imports {outside}"


def test_few_modules_at_the_top_level_and_the_entry_points_among_them():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    assert set(ENTRY_POINTS) <= set(top)
    assert set(top) - {"__init__"} == set(ENTRY_POINTS), "a library module at the top level: move it to its package"


@pytest.mark.parametrize("entry", [*ENTRY_POINTS, "data/check"])
def test_entry_points_are_thin(entry):
    path = PACKAGE / f"{entry}.py"
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_ENTRY_POINT_LINES, f"{path.name}: {lines} lines; its library work belongs in a package"


def test_entry_points_do_not_import_each_other():
    graph = import_graph()
    entries = {f"compress_lit.{e}" for e in ENTRY_POINTS}
    for e in entries:
        assert not graph[e] & entries, f"{e} imports {graph[e] & entries}: share a library function instead"
    packages = {n for n in graph if n not in entries}
    for n in packages:
        assert not graph[n] & entries, f"{n} imports the entry point(s) {graph[n] & entries}: imports run downhill"
