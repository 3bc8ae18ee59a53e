"""The import graph of llmsup has no cycles: every import counts, those under
TYPE_CHECKING and those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import llmsup

ROOT = Path(llmsup.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ["llmsup", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The llmsup modules that `name` imports (a package's `from p import m` names m)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (its modules in import order), or None."""
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return [*stack[stack.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(edges.get(node, ())):
            found = visit(nxt, [*stack, node])
            if found:
                return found
        done.add(node)
        return None

    for start in sorted(edges):
        found = visit(start, [])
        if found:
            return found
    return None


def test_the_scan_sees_the_imports_it_must() -> None:
    edges = graph()
    assert "llmsup.errors" in edges["llmsup.api"]
    assert "llmsup.control" in edges["llmsup.api"]
    assert "llmsup.api" in edges["llmsup.daemon"]  # imported inside a method
    assert "llmsup.process" in edges["llmsup.daemon"]  # `from llmsup import process`


def test_a_cycle_is_found() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle(edges) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_llmsup_imports_have_no_cycle() -> None:
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found or [])


def test_the_api_and_the_gateway_know_the_daemon_only_as_control() -> None:
    edges = graph()
    near = [n for n in edges if n == "llmsup.api" or n.startswith("llmsup.gateway")]
    assert "llmsup.gateway.routing" in near
    for name in near:
        assert "llmsup.daemon" not in edges[name], name
