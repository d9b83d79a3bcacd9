"""Lists import cycles between the project's modules; exits 1 if there is any.

Every import counts, at module level or inside a function, except those under `if TYPE_CHECKING:`.
Run: python tools/import_cycles.py [--functions]   (--functions also lists function-level imports
of project modules, which the tree keeps at zero so that no cycle hides behind one).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "jobs", "mp", "pp", "tp")


def module_name(path: Path) -> str:
    """The dotted name of a file under ROOT (a package's __init__ is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every Python module of the project's packages, by dotted name."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, name: str, is_package: bool):
    """(names the import may mean, most specific first; line; inside a function) for every import."""
    package = name if is_package else name.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from visit(sub, in_function)
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield (alias.name,), child.lineno, in_function
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                for alias in child.names:  # `from core import config`: the submodule, else the package
                    yield (f"{mod}.{alias.name}", mod), child.lineno, in_function
            yield from visit(child, inner)

    yield from visit(tree, False)


def import_graph(modules: dict[str, Path] | None = None):
    """Edges between project modules, and the function-level imports of project modules."""
    modules = project_modules() if modules is None else modules
    graph: dict[str, set[str]] = {m: set() for m in modules}
    function_level: list[tuple[str, int, str]] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for candidates, line, in_function in _imports(tree, name, path.name == "__init__.py"):
            target = next((c for c in candidates if c in modules), None)
            if target is not None and target != name:
                graph[name].add(target)
                if in_function:
                    function_level.append((name, line, target))
    return graph, sorted(set(function_level))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(found)


def main(argv: list[str]) -> int:
    graph, function_level = import_graph()
    found = cycles(graph)
    for component in found:
        inside = set(component)
        print(f"cycle among {len(component)} modules:")
        for m in component:
            print(f"  {m} -> {', '.join(sorted(graph[m] & inside))}")
    if "--functions" in argv:
        for name, line, target in function_level:
            print(f"function-level import: {name}:{line} imports {target}")
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(found)} cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
