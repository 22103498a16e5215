"""The package's imports form no cycle: every module imports only modules below it (a function-level
import counts as much as one at the top; main.py's modes, named as strings, are not imports).

A cycle is what let config validate the tune's grammar and the cache build the attack's programs; this
test names the modules of the first cycle it finds, so a new one is seen at the commit that makes it."""
import ast
from pathlib import Path

import armu_jax

PACKAGE = Path(armu_jax.__file__).parent


def _imports(path: Path) -> set[str]:
    """The armu_jax modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("armu_jax.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "armu_jax":
            if node.module == "armu_jax":
                found |= {a.name for a in node.names}
            else:
                found.add(node.module.split(".")[1])
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    edges = graph()
    assert len(edges) > 30  # the graph is read: every module, and the imports below
    assert {"config", "model", "step"} <= edges["train"]
    cycle = find_cycle(edges)
    assert cycle is None, "an import cycle: " + " -> ".join(cycle)
