"""No import circle inside megatron_refine: each module's megatron_refine imports (module level or inside functions,
not the TYPE_CHECKING-only ones) form a graph without cycles, so data flows one way (STYLE.md)."""

import ast
from pathlib import Path

import megatron_refine

ROOT = Path(megatron_refine.__file__).parent


def _import_graph() -> dict[str, set[str]]:
    modules = {".".join(("megatron_refine", *f.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__"): f
               for f in ROOT.rglob("*.py")}
    packages = {name for name, f in modules.items() if f.name == "__init__.py"}
    graph = {}
    for name, f in modules.items():
        tree = ast.parse(f.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                       ast.unparse(node.test) for part in node.body for n in ast.walk(part)}
        targets = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from pkg import submodule` imports the module
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
        # a package's __init__ only re-exports its modules: the edges between modules are what can circle
        graph[name] = {t for t in targets if t in modules and t != name and t not in packages}
    return {name: edges for name, edges in graph.items() if name not in packages}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_the_walk_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_import_circle_in_the_package():
    graph = _import_graph()
    assert "megatron_refine.evaluation.ttt" in graph and graph["megatron_refine.evaluation.runner"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
