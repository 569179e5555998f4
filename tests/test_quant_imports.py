"""The quantizer's layering (issue 16): nothing under tinychat/quant imports the hub, the loader or the
command line, directly or through other tinychat modules, and no tinychat import cycle runs through
quant/. Read from the source with ast, so imports inside functions (the lazy ones) count too."""

from __future__ import annotations

import ast
from pathlib import Path

from tinychat.cli import COMMAND_MODULES

PACKAGE = Path(__file__).resolve().parent.parent / "tinychat"
FORBIDDEN = {"tinychat.hub", "tinychat.loader", "tinychat.cli"} | {f"tinychat.{m}" for m in COMMAND_MODULES}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """tinychat modules that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` imports, directly or not -> the module that imports it (for the message)."""
    seen, todo = {}, [start]
    while todo:
        here = todo.pop()
        for nxt in graph[here]:
            if nxt not in seen and nxt != start:
                seen[nxt] = here
                todo.append(nxt)
    return seen


def chain(via: dict[str, str], start: str, end: str) -> str:
    path = [end]
    while path[-1] != start:
        path.append(via[path[-1]])
    return " -> ".join(reversed(path))


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components with more than one module (each one holds a cycle)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_known_imports():
    graph = import_graph()
    assert "tinychat.quant.pack" in graph["tinychat.quant.qlinear"]  # from . import pack
    assert "tinychat.quant.awq" in graph["tinychat.quant.quantize"]  # from .awq import ...
    assert "tinychat.quant.quantize" in graph["tinychat.quantize_cmd"]  # lazy, inside run()


def test_quant_never_reaches_hub_loader_or_cli():
    graph = import_graph()
    bad = []
    for name in sorted(n for n in graph if n.startswith("tinychat.quant.")):
        via = reachable(graph, name)
        bad += [chain(via, name, f) for f in sorted(FORBIDDEN & via.keys())]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_through_quant():
    cycles = [sorted(c) for c in strongly_connected(import_graph()) if any(m.startswith("tinychat.quant") for m in c)]
    assert not cycles, cycles


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [{"a", "b", "c"}]
