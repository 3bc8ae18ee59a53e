"""YAML to plain data, keeping where every value came from.

PyYAML's constructors drop positions and silently keep the last of two equal
keys. We compose the node tree ourselves so that every error can name
`file:line:column`, duplicate keys are errors, and `${VAR}` / `${VAR:-default}`
expand from the environment with the position of the string that held them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]

_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{([^}]*)\}?")
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class Pos:
    line: int
    column: int


@dataclass
class Source:
    """Plain data read from YAML, with positions of keys and values."""

    file: str
    data: Any
    values: dict[KeyPath, Pos] = field(default_factory=dict)
    keys: dict[KeyPath, Pos] = field(default_factory=dict)
    # (path, message, pos) found while reading: syntax, duplicates, ${VAR}
    problems: list[tuple[KeyPath, str, Pos]] = field(default_factory=list)

    def pos(self, path: KeyPath, *, key: bool = False) -> Pos:
        """Position of `path`, or of its nearest ancestor that has one."""
        table = self.keys if key else self.values
        p = tuple(path)
        while p:
            if p in table:
                return table[p]
            if p in self.values:
                return self.values[p]
            p = p[:-1]
        return self.values.get((), Pos(1, 1))


def _pos(mark: yaml.Mark | None) -> Pos:
    return Pos(mark.line + 1, mark.column + 1) if mark is not None else Pos(1, 1)


def expand_env(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`.

    Returns the text and the problems found (unset variables, bad syntax).
    """
    problems: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name is None:
            problems.append(
                f"bad variable reference {m.group(0)!r}: use ${{NAME}} or ${{NAME:-default}}"
            )
            return m.group(0)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(
            f"environment variable {name} is not set "
            f"(set it, or give a default: ${{{name}:-value}})"
        )
        return ""

    return _ENV_RE.sub(sub, text), problems


class _Reader:
    def __init__(self, src: Source, env: Mapping[str, str]) -> None:
        self.src = src
        self.env = env
        self.constructor = yaml.constructor.SafeConstructor()

    def node(self, node: yaml.Node, path: KeyPath) -> Any:
        self.src.values.setdefault(path, _pos(node.start_mark))
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.node(item, (*path, i)) for i, item in enumerate(node.value)]
        value = self.constructor.construct_object(node, deep=True)
        if isinstance(value, str) and "$" in value:
            value, errs = expand_env(value, self.env)
            for e in errs:
                self.src.problems.append((path, e, _pos(node.start_mark)))
        return value

    def mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first: dict[str, Pos] = {}
        for k_node, v_node in node.value:
            if k_node.tag == _MERGE_TAG:
                merged = self.node(v_node, path)
                for item in merged if isinstance(merged, list) else [merged]:
                    if isinstance(item, dict):
                        for k, v in item.items():
                            out.setdefault(k, v)
                continue
            if not isinstance(k_node, yaml.ScalarNode):
                self.src.problems.append(
                    (path, "keys must be plain strings", _pos(k_node.start_mark))
                )
                continue
            key = str(k_node.value)
            kpos = _pos(k_node.start_mark)
            if key in first:
                self.src.problems.append(
                    (
                        (*path, key),
                        f"duplicate key {key!r} (first defined at line {first[key].line})",
                        kpos,
                    )
                )
                continue
            first[key] = kpos
            key_path = (*path, key)
            self.src.keys[key_path] = kpos
            out[key] = self.node(v_node, key_path)
        return out


def read_yaml(text: str, file: str, env: Mapping[str, str]) -> Source:
    """Parse `text`; syntax problems land in `Source.problems`, never raise."""
    src = Source(file=file, data=None)
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        msg = f"YAML syntax error: {e.problem or e.context}"
        if e.context and e.problem:
            msg = f"YAML syntax error: {e.problem} ({e.context})"
        src.problems.append(((), msg, _pos(mark)))
        return src
    except yaml.YAMLError as e:
        src.problems.append(((), f"YAML error: {e}", Pos(1, 1)))
        return src
    if root is None:
        return src
    src.data = _Reader(src, env).node(root, ())
    return src


def dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
