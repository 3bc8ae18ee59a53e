"""An export's files on disk: the only effects of `llmsup.export`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

MARK = "# Written by `llmsup export kubernetes`"
LINE = 1000  # a long command line stays one line, as `kubectl get -o yaml` shows it


class _Dumper(yaml.SafeDumper):
    """Block style, no anchors, multi-line strings (a manifest in a ConfigMap) as `|`."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def dump(objs: list[dict[str, Any]], source: str) -> str:
    """One YAML file of `objs`, under a header naming the manifest it came from."""
    head = f"{MARK} from {source}: export again rather than edit.\n"
    body = yaml.dump_all(
        objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=LINE
    )
    return head + body


def write(directory: Path, files: Mapping[str, list[dict[str, Any]]], source: str) -> list[Path]:
    """Write each file into `directory` (made if missing); remove the files an earlier
    export wrote there that this one does not (those that start with MARK)."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in sorted(directory.glob("*.yaml")):
        if old.name not in files and _ours(old):
            old.unlink()
    written = []
    for name, objs in files.items():
        path = directory / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(dump(objs, source), encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def _ours(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().startswith(MARK)
    except (OSError, UnicodeDecodeError):
        return False
