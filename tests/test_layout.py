"""The shape of the code base: no import circles inside the package (function-level imports included), no module
over the ~400-line guide, nothing that names the shared folder beside a development clone by its path."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "foundation"
MAX_LINES = 420   # "files under ~400 lines"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (module level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules}
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    edges = {m: imports(p, modules) for m, p in files.items()}
    # importing a package runs its __init__: an edge to "a.b.c" implies edges to "a.b" and "a"; a package's
    # __init__ importing its own submodules is how packages work and is not a circle by itself
    return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in edges.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_inside_the_package():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_planted_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]


def test_no_file_over_the_line_guide():
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "*.py"], capture_output=True, text=True).stdout
    long = {f: n for f in tracked.split() if (n := len((REPO / f).read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_nothing_names_the_shared_folder():
    found = subprocess.run(["git", "-C", str(REPO), "grep", "-l", "-F", "../" + "shared"], capture_output=True,
                           text=True).stdout.split()
    assert found == []


def test_test_module_names_are_unique():
    """Test folders have no __init__.py, so two test modules with one basename break collection (and a
    `from test_x import ...` would pick whichever was imported first)."""
    names = [p.name for p in (REPO / "tests").rglob("*.py") if p.name != "conftest.py"]
    assert sorted({n for n in names if names.count(n) > 1}) == []
