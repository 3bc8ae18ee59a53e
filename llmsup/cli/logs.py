"""`llmsup logs NAME [-f]`: a model's server log, from the state directory."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import click

from llmsup.cli.common import or_global, target
from llmsup.errors import DaemonError, NoDaemonError, UnknownModel


@click.command()
@click.option(
    "--file",
    "manifest_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    callback=or_global,
    help="Manifest (to find the state directory); `llmsup -f FILE logs` works too.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C ends).")
@click.option("-n", "lines", default=50, show_default=True, help="Lines to show.")
@click.argument("name")
def logs(manifest_file: Path | None, follow: bool, lines: int, name: str) -> None:
    """Show a model's server log (stdout and stderr)."""
    from llmsup.client import call

    there = target(manifest_file)
    logs_dir = there.state.logs
    path = there.state.log(name)
    try:
        _, data = call(there.state.socket, "GET", "/v1/status", timeout=5.0)
        row = next((r for r in data["models"] if name in (r["name"], r["unit"])), None)
        remote = next((r for r in data.get("remotes", []) if r["name"] == name), None)
        if row is None and remote is not None:
            urls = ", ".join(u["url"] for u in remote["upstreams"])
            raise DaemonError(
                f"{name!r} is a remote model: no server of it runs here, its logs are on "
                f"the hosts that serve it ({urls}); `llmsup status {name}` shows each "
                "upstream's state and last error"
            )
        if row is None:
            known = ", ".join(r["name"] for r in data["models"]) or "none"
            raise UnknownModel(f"no model named {name!r} (known: {known})")
        path = Path(row["log"])
    except NoDaemonError:
        pass  # the log files outlive the daemon
    if not path.exists():
        known = ", ".join(sorted(p.name[:-4] for p in logs_dir.glob("*.log"))) or "none"
        raise DaemonError(
            f"no log for {name!r} in {logs_dir} (logs there: {known}); "
            f"is {there.manifest} the manifest that ran it? Name it with --file"
        )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one stops following
        _print_log(path, lines, follow)


def _print_log(path: Path, lines: int, follow: bool) -> None:
    with open(path, "rb") as f:
        text = f.read()  # to its end, even for `-n 0`: what follows is new
        tail = text.splitlines()[-lines:] if lines > 0 else []
        for raw in tail:
            click.echo(raw.decode("utf-8", "replace"))
        while follow:
            chunk = f.read()
            if chunk:
                click.echo(chunk.decode("utf-8", "replace"), nl=False)
            elif path.exists() and path.stat().st_ino != os.fstat(f.fileno()).st_ino:
                f.close()
                f = open(path, "rb")  # noqa: SIM115 - rotated: follow the new file
            else:
                time.sleep(0.2)
