"""The `llmsup` command line: parse, call, format. No decisions here.

Commands live by concern (manifest, daemon, logs, gpus, systemd); what they print
comes from `render`, fed the same data as `--json`. This module holds the group and
the one place that turns an LlmsupError into a message and its exit code.

Heavy modules (pydantic, aiohttp, psutil) are imported inside commands so that
`llmsup --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from llmsup import __version__
from llmsup.cli import daemon, export, gpus, logs, manifest, systemd
from llmsup.cli.common import MANIFEST_HELP
from llmsup.errors import ExitCode, LlmsupError, ManifestError


class _Group(click.Group):
    """Prints LlmsupError as one clean message and maps it to its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\nllmsup: interrupted", err=True)
            sys.exit(ExitCode.INTERRUPTED)
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
@click.option(
    "-f",
    "--file",
    "manifest_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=MANIFEST_HELP + " Also accepted after the command (`--file` in `logs`).",
)
def main(manifest_file: Path | None) -> None:
    """Supervise vLLM and Ollama servers declared in one manifest (models.yaml)."""


for _command in (
    manifest.check,
    manifest.plan,
    daemon.up,
    daemon.reload,
    daemon.status,
    gpus.gpus,
    *daemon.MODEL_ACTIONS,
    daemon.down,
    logs.logs,
    systemd.systemd,
    export.export,
    manifest.schema,
):
    main.add_command(_command)
