"""pyproject.toml declares exactly the third-party packages llmsup imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions(package: Path) -> dict[str, str]:
    """Distribution -> one file that imports it, for every import of `package`."""
    owners = importlib.metadata.packages_distributions()
    out: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("llmsup", "__future__"):
                    continue
                assert top in owners, f"{path}: {top} is imported but not installed"
                for dist in owners[top]:
                    out.setdefault(_norm(dist), str(path.relative_to(ROOT)))
    return out


def declared() -> set[str]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_norm(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in project["dependencies"]}


def test_runtime_dependencies_are_exactly_what_the_package_imports() -> None:
    used = imported_distributions(ROOT / "llmsup")
    want = declared()
    unused = sorted(want - set(used))
    undeclared = sorted(f"{d} (imported by {used[d]})" for d in set(used) - want)
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_readme_says_what_each_runtime_dependency_is_for() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Dependencies", 1)
    assert len(section) == 2, "README.md has no `## Dependencies` section"
    body = section[1].split("\n## ", 1)[0].lower()
    missing = [d for d in sorted(declared()) if f"`{d}`" not in body]
    assert not missing, f"README's Dependencies section does not name: {missing}"
