"""The import structure: ``import repa_fast.engine.parallel`` loads no backend it does not need, and no repa_fast
module imports one that imports it back (the graph is read from the source with ``ast``; nothing is imported)."""

import ast
import json
import os
import pkgutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "repa_fast")
BACKEND_MODULES = [f"repa_fast.engine.parallel.{m}" for m in ("ddp", "fsdp", "deepspeed")]


def walk_modules(path: str, prefix: str) -> dict[str, tuple[str, bool]]:
    """{module name: (file, is_package)} of every module under the package directory ``path``, without importing."""
    out = {prefix: (os.path.join(path, "__init__.py"), True)}
    for info in pkgutil.iter_modules([path]):
        name = f"{prefix}.{info.name}"
        if info.ispkg:
            out.update(walk_modules(os.path.join(path, info.name), name))
        else:
            out[name] = (os.path.join(path, info.name + ".py"), False)
    return out


def _import_nodes(body: list, lazy: bool):
    """Import statements run at import time (module and class bodies, if/try/with blocks); with ``lazy``, also those
    inside functions."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if lazy:
                yield from (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _import_nodes(getattr(node, field, []) or [], lazy)


def imports_of(name: str, file: str, is_pkg: bool, known: set, lazy: bool = False) -> set:
    """The modules of ``known`` that module ``name`` names in its imports (a package's own parents, which Python runs
    first anyway, are not edges)."""
    with open(file) as f:
        tree = ast.parse(f.read(), file)
    here = name if is_pkg else name.rpartition(".")[0]
    targets = set()
    for node in _import_nodes(tree.body, lazy):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from .x import y / from .. import z
            parts = here.split(".")
            anchor = ".".join(parts[: len(parts) - node.level + 1])
            base = f"{anchor}.{base}" if base else anchor
        targets.add(base)
        targets.update(f"{base}.{a.name}" for a in node.names)
    return {t for t in targets if t in known and t != name and not name.startswith(t + ".")}


def import_graph(path: str, prefix: str, lazy: bool = False) -> dict[str, set]:
    modules = walk_modules(path, prefix)
    return {n: imports_of(n, f, pkg, set(modules), lazy) for n, (f, pkg) in modules.items()}


def find_cycle(graph: dict[str, set]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_repa_fast_has_no_import_cycle():
    graph = import_graph(PACKAGE_DIR, "repa_fast")
    assert len(graph) > 30 and "repa_fast.engine.parallel.base" in graph["repa_fast.engine.parallel"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_parallel_package_has_no_cycle_even_through_lazy_imports():
    """make_backend imports its backends inside the function; none of them imports the package back."""
    graph = import_graph(PACKAGE_DIR, "repa_fast", lazy=True)
    inside = {n: {t for t in e if t.startswith("repa_fast.engine.")} for n, e in graph.items()}
    assert set(BACKEND_MODULES) <= inside["repa_fast.engine.parallel"]  # the lazy imports are seen
    base = "repa_fast.engine.parallel.base"
    assert not inside[base] & {"repa_fast.engine.parallel", *BACKEND_MODULES}  # the base imports no subclass
    cycle = find_cycle({n: e for n, e in inside.items() if n.startswith("repa_fast.engine.")})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import g\n")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n\ndef f():\n    from pkg import c\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\n\ng = 1\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    graph = import_graph(str(pkg), "pkg")
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
    assert "pkg.c" in import_graph(str(pkg), "pkg", lazy=True)["pkg.a"]  # the function-level import
    del graph["pkg.sub.b"]
    assert find_cycle(graph) is None


@pytest.fixture(scope="module")
def loaded_modules():
    """sys.modules after ``import repa_fast.engine.parallel`` in a fresh interpreter, then after also importing the
    fsdp backend (the positive control: the same check sees a backend when one is imported)."""
    code = (
        "import json, sys\n"
        "import repa_fast.engine.parallel\n"
        "first = sorted(sys.modules)\n"
        "import repa_fast.engine.parallel.fsdp\n"
        "print(json.dumps([first, sorted(sys.modules)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_parallel_package_loads_no_backend(loaded_modules):
    first, after_fsdp = loaded_modules
    assert "repa_fast.engine.parallel" in first and "repa_fast.engine.parallel.base" in first
    assert [m for m in BACKEND_MODULES if m in first] == []
    assert [m for m in first if m == "deepspeed" or m.startswith("deepspeed.")] == []
    assert "repa_fast.engine.parallel.fsdp" in after_fsdp
