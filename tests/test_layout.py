"""The package's shape: imports inside minillm/ go one way (no cycle, counting imports inside
functions too), and the core never imports a paper method (minillm/methods/)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minillm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The minillm modules `path` imports anywhere in its body (`from . import x` counts x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # minillm.model.GPT -> minillm.model
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_relative_imports():
    graph = import_graph()
    assert "minillm.model" in graph["minillm.generate"]            # from .model import GPT
    assert "minillm.moe_kernels" in graph["minillm.moe"]           # from . import moe_kernels
    assert "minillm.minhash" in graph["minillm.methods.wanjuan_cc.pipeline"]  # from ...minhash


def test_imports_inside_the_package_have_no_cycle():
    assert find_cycle(import_graph()) is None


def test_the_core_never_imports_a_method():
    offenders = {module: sorted(m for m in imports if m.startswith("minillm.methods"))
                 for module, imports in import_graph().items()
                 if not module.startswith("minillm.methods")}
    assert {m: found for m, found in offenders.items() if found} == {}
