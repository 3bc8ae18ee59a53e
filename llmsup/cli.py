"""The `llmsup` command line: parse, call, format. No decisions here.

Heavy modules (pydantic, aiohttp, psutil) are imported inside commands so that
`llmsup --help` stays fast.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from llmsup import __version__
from llmsup.errors import ExitCode, LlmsupError, ManifestError

if TYPE_CHECKING:
    from llmsup.manifest import LoadedManifest
    from llmsup.plan import Plan

F = TypeVar("F", bound=Callable[..., Any])


def manifest_option(fn: F) -> F:
    return click.option(
        "-f",
        "--file",
        "manifest_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Manifest (default: $LLMSUP_MANIFEST, ./models.yaml, /etc/llmsup/models.yaml).",
    )(fn)


def _load(manifest_file: Path | None) -> tuple[LoadedManifest, Plan]:
    from llmsup.manifest import default_manifest_path, load_manifest
    from llmsup.plan import make_plan

    loaded = load_manifest(manifest_file or default_manifest_path())
    plan = make_plan(loaded)
    if plan.errors:
        raise ManifestError(sorted(plan.problems, key=lambda p: (p.line, p.column)))
    for warning in plan.problems:
        click.echo(str(warning), err=True)
    return loaded, plan


class _Group(click.Group):
    """Prints LlmsupError as one clean message and maps it to its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ManifestError as e:
            for p in e.problems:
                click.echo(str(p), err=True)
            n = len(e.errors)
            click.echo(f"{n} error{'s' if n != 1 else ''}: manifest not valid", err=True)
            sys.exit(e.exit_code)
        except LlmsupError as e:
            click.echo(f"llmsup: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmsup")
def main() -> None:
    """Supervise vLLM and Ollama servers declared in one manifest (models.yaml)."""


@main.command()
@manifest_option
def check(manifest_file: Path | None) -> None:
    """Validate the manifest and its cross-model rules; exit 2 if invalid."""
    loaded, plan = _load(manifest_file)
    n = len(loaded.manifest.models)
    warnings = len(plan.problems)
    click.echo(
        f"{loaded.path}: OK, {n} model{'s' if n != 1 else ''} in {len(plan.launches)} "
        f"server{'s' if len(plan.launches) != 1 else ''}"
        + (f", {warnings} warning{'s' if warnings != 1 else ''}" if warnings else "")
    )


@main.command()
@manifest_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("names", nargs=-1)
def plan(manifest_file: Path | None, as_json: bool, names: tuple[str, ...]) -> None:
    """Show the exact command line and environment of each model, in launch order."""
    loaded, the_plan = _load(manifest_file)
    unknown = [n for n in names if n not in loaded.manifest.models]
    if unknown:
        known = ", ".join(loaded.manifest.models)
        click.echo(f"llmsup: no model named {', '.join(unknown)} (known: {known})", err=True)
        sys.exit(ExitCode.FAILURE)
    entries = [e for e in the_plan.to_json() if not names or e["name"] in names]
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    shown: set[str] = set()
    for i, e in enumerate(entries, 1):
        if e["unit"] in shown:
            click.echo(f"# {i}. {e['name']} ({e['backend']}): served by {e['unit']}'s server\n")
            continue
        shown.add(e["unit"])
        after = f", after {', '.join(e['after'])} is ready" if e["after"] else ""
        click.echo(f"# {i}. {e['name']} ({e['backend']}) on {e['host']}:{e['port']}{after}")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in e["env"].items())
        cmd = shlex.join(e["argv"])
        click.echo(f"{env} \\\n  {cmd}" if env else cmd)
        for step in e["steps"]:
            click.echo(f"#   then {step}")
        click.echo("")


@main.command()
def schema() -> None:
    """Print the manifest's JSON Schema (for editors)."""
    from llmsup.manifest import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


if __name__ == "__main__":
    main()
