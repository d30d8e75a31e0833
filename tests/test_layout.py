"""The package's layout rules, read from the source with ast (nothing is imported):

- no import cycle between omnic modules, counting imports inside functions too;
- library modules never import the command line (``omnic.cli``);
- TVM is imported only under ``omnic/compile/`` and ``omnic/remote/``, at module top level (a lazy
  import inside a function must say why on its line, with the word "lazy");
- no source file over 500 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "omnic"
TVM_ROOMS = ("omnic.compile", "omnic.remote")
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, importer: str, is_package: bool, level: int) -> str:
    if not level:
        return module
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - level + 1]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """Yields ``(imported omnic module or tvm module, ast node, inside a function)``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child, in_function
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child.module or "", name, is_package, child.level)
                # `from pkg import sub` runs pkg/__init__ too: an edge to both
                yield from ((f"{base}.{a.name}", child, in_function) for a in child.names
                            if f"{base}.{a.name}" in modules)
                yield base, child, in_function
            yield from visit(child, nested)

    yield from visit(tree, False)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            while target and target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]  # `import omnic.a.b.attr`-style names
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_cycle_detector_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles between omnic modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_library_never_imports_the_cli():
    offenders = sorted(f"{name} -> {target}" for name, targets in _graph().items()
                       if not name.startswith("omnic.cli") for target in targets
                       if target == "omnic.cli" or target.startswith("omnic.cli."))
    assert not offenders, offenders


def test_tvm_only_in_compile_and_remote_at_top_level():
    outside, local = [], []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        for target, node, in_function in _imports(name, path, _modules()):
            if target.split(".")[0] not in ("tvm", "tvm_ffi"):
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if not name.startswith(TVM_ROOMS):
                outside.append(where)
            elif in_function and "lazy" not in lines[node.lineno - 1]:
                local.append(where)
    assert not outside, f"TVM imported outside omnic/compile and omnic/remote: {outside}"
    assert not local, f"function-local TVM imports without a 'lazy: why' comment: {local}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_source_file_over_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path} has {n} lines; split it by concept"
