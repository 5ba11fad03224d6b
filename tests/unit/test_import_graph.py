"""The house's floors, read from the source: every `import` in dsft/ (at module level, inside functions and under
TYPE_CHECKING alike) forms no circle, and no module imports a floor above its own. A shared capability lives on the
lowest floor all its users reach (generation and head predictions under models/, used by eval, train and serve)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2] / "dsft"

FLOORS = [
    ("", "errors", "paths", "userfunc", "plots", "markdown", "config"),  # the package root's helpers and the config
    ("data",),
    ("models",),
    ("eval",),  # below train: training scores with the same metrics dsft eval reports
    ("export",),  # below train: a multi-stage run merges each stage's adapter
    ("train",),
    ("lifecycle",),  # below serve: a server logs its deployments in the registry and serves registry:NAME@ALIAS
    ("compress",),  # judges a compression's price by the gate's rule
    ("serve",),
    ("bench",),
    ("cli",),
]
"""Floors from the bottom; a module may import its own floor and those below."""


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _target(name: str, known: dict[str, Path]) -> str:
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the dsft modules it imports (a name imported from a package counts as its submodule if it is one)."""
    known = modules()
    graph = {}
    for module, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {_target(a.name, known) for a in node.names if a.name.split(".")[0] == "dsft"}
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(node, module, path.name == "__init__.py")
                if source.split(".")[0] == "dsft":
                    targets |= {f"{source}.{a.name}" if f"{source}.{a.name}" in known else _target(source, known)
                                for a in node.names}
        graph[module] = targets - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def floor_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(FLOORS) if top in names)


def test_the_walker_sees_imports_inside_functions_and_finds_circles():
    graph = import_graph()
    assert "dsft.models.multitask" in graph["dsft.models.load"]  # imported inside load_multitask_run only
    assert "dsft.config.run" in graph["dsft.config"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_dsft():
    assert cycles(import_graph()) == []


def test_every_package_has_a_floor_and_no_module_imports_a_floor_above_its_own():
    graph = import_graph()
    upward = [f"{module} -> {target}" for module, targets in sorted(graph.items()) for target in sorted(targets)
              if floor_of(target) > floor_of(module)]
    assert upward == []
    assert not any(t.startswith("dsft.serve") for m, ts in graph.items() if m.startswith(("dsft.models", "dsft.eval"))
                   for t in ts)
