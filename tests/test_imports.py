"""rfdit's import graph: no cycles, and no library module imports the training run.

Every import statement in rfdit/ counts, those inside functions included: a cycle through a function-level
import still ties the modules together, and only shows when the function runs. The run (`rfdit.run`, and
`rfdit.experiment` that re-exports it) sits on top of the library: it may import any library module, none may
import it.
"""

import ast
import pathlib

SOURCE = pathlib.Path(__file__).resolve().parent.parent / "rfdit"
RUN_MODULES = ("rfdit.run", "rfdit.experiment")


def modules(source: pathlib.Path) -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted module name -> (file, whether it is a package's __init__), for every .py file under `source`."""
    out = {}
    for path in sorted(source.rglob("*.py")):
        parts = list(path.relative_to(source.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imports(tree: ast.AST, in_function: bool = False):
    """(import node, whether it sits inside a function) for every import statement under `tree`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        yield from _imports(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


def import_graph(source: pathlib.Path = SOURCE, *, in_functions: bool | None = None) -> dict[str, dict[str, int]]:
    """module -> {imported module of the same package: line of the first import}, function-level ones included
    (only those with `in_functions=True`, none with False).

    `from .a import b` counts as an import of `a.b` when that is a module, else of `a`; a parent package that
    Python also runs on the way is not counted (a module importing its own package's names is no cycle).
    """
    table = modules(source)
    root = source.name

    def known(name: str) -> str | None:
        while name not in table and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in table else None

    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_package) in table.items():
        package = name if is_package else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node, in_function in _imports(ast.parse(path.read_text(), str(path))):
            if in_functions is not None and in_function != in_functions:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [known(alias.name) for alias in node.names if alias.name.split(".")[0] == root]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base.split(".")[0] != root:
                    continue
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in table else known(base)
                           for alias in node.names]
            for target in targets:
                if target is not None:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, {}):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_run(name: str) -> bool:
    return any(name == run or name.startswith(run + ".") for run in RUN_MODULES)


def describe(graph, component) -> str:
    members = set(component)
    return "; ".join(f"{a} -> {b} (line {line})" for a in component for b, line in sorted(graph[a].items())
                     if b in members)


def test_imports_form_no_cycle():
    graph = import_graph()
    assert "rfdit.generation" in graph and graph["rfdit"]  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(describe(graph, c) for c in found)


def test_imports_no_library_module_imports_the_run():
    graph = import_graph()
    offending = [f"{a} -> {b} (line {line})" for a, edges in sorted(graph.items()) if not is_run(a)
                 for b, line in sorted(edges.items()) if is_run(b)]
    assert not offending, "library modules importing the run: " + "; ".join(offending)


def test_imports_of_rfdit_modules_sit_at_module_level():
    # a lazy import hides a cycle until the function runs; only heavy or optional third-party packages
    # (torch, tensorflow-datasets, wandb, orbax, scikit-learn's models...) are imported inside functions
    lazy = [f"{a} -> {b} (line {line})" for a, edges in sorted(import_graph(in_functions=True).items())
            for b, line in sorted(edges.items())]
    assert not lazy, "rfdit modules imported inside functions; import them at module level: " + "; ".join(lazy)


def test_imports_graph_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("import os\n\ndef f():\n    from .sub import b\n    return b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from .. import c\nfrom ..a import f\n")
    (package / "c.py").write_text("def g():\n    import pkg.sub.b\n")
    graph = import_graph(package)
    assert graph == {"pkg": {"pkg.a": 1}, "pkg.a": {"pkg.sub.b": 4}, "pkg.c": {"pkg.sub.b": 2}, "pkg.sub": {},
                     "pkg.sub.b": {"pkg.c": 1, "pkg.a": 2}}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert import_graph(package, in_functions=True) == {"pkg": {}, "pkg.a": {"pkg.sub.b": 4}, "pkg.c": {"pkg.sub.b": 2},
                                                         "pkg.sub": {}, "pkg.sub.b": {}}
    assert cycles({"x": {"x": 1}}) == [["x"]] and cycles({"x": {"y": 1}, "y": {}}) == []
