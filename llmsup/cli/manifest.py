"""Commands that read the manifest alone: check, plan, schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from llmsup.cli import render
from llmsup.cli.common import UNTRUSTED_HELP, load, manifest_option
from llmsup.errors import UnknownModel


@click.command()
@manifest_option
@click.option("--untrusted", is_flag=True, help=UNTRUSTED_HELP)
def check(manifest_file: Path | None, untrusted: bool) -> None:
    """Validate the manifest, its cross-model rules, and its GPUs; exit 2 if invalid."""
    import shutil

    from llmsup.plan import missing_executables

    loaded, plan = load(manifest_file, gpus=True, untrusted=untrusted, gpu_note=True)
    search = os.environ.get("PATH", os.defpath)
    absent = missing_executables(loaded, plan, lambda exe: shutil.which(exe, path=search), search)
    for p in absent:
        click.echo(str(p), err=True)
    if plan.vllm_flags is not None and not plan.vllm_flags.exact:
        click.echo(f"note: vLLM flags: {plan.vllm_flags.why}", err=True)
    n = len(loaded.manifest.models)
    warnings = len(plan.problems) + len(absent)
    remote = f" and {len(plan.remotes)} remote" if plan.remotes else ""
    click.echo(
        f"{loaded.path}: OK, {n} model{'s' if n != 1 else ''} in {len(plan.launches)} "
        f"server{'s' if len(plan.launches) != 1 else ''}{remote}"
        + (f", {warnings} warning{'s' if warnings != 1 else ''}" if warnings else "")
    )


@click.command()
@manifest_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("names", nargs=-1)
def plan(manifest_file: Path | None, as_json: bool, names: tuple[str, ...]) -> None:
    """Show the exact command line and environment of each model, in launch order."""
    loaded, the_plan = load(manifest_file)
    unknown = [n for n in names if n not in loaded.manifest.models]
    if unknown:
        known = ", ".join(loaded.manifest.models)
        raise UnknownModel(f"no model named {', '.join(unknown)} (known: {known})")
    entries = [e for e in the_plan.to_json() if not names or e["name"] in names]
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    flags = the_plan.vllm_flags
    lines = render.plan(entries, None if flags is None else (flags.version, flags.why))
    if lines:
        click.echo("\n".join(lines))


@click.command()
def schema() -> None:
    """Print the manifest's JSON Schema (for editors)."""
    from llmsup.manifest import json_schema

    click.echo(json.dumps(json_schema(), indent=2))
