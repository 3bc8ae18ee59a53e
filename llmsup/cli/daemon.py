"""Commands that run the daemon or talk to it: up, down, reload, status, and
start/stop/restart of one model."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from llmsup.cli import leftovers, render
from llmsup.cli.common import UNTRUSTED_HELP, Target, call, load, manifest_option, target
from llmsup.errors import DaemonError, ExitCode, LlmsupError, NoDaemonError, UnknownModel


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


class Progress:
    """Prints state changes; says once when every server is ready or failed."""

    def __init__(self, quiet: bool, first: Callable[[], str | None] = lambda: None) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()
        self.states: dict[str, str] = {}
        self.printed: dict[str, float] = {}
        self.settled = False
        self.first = first  # said before the first event (the daemon is up by then)

    def __call__(self, unit: str, state: Any, detail: str) -> None:
        if not self.states and not self.quiet and (line := self.first()):
            click.echo(f"{_stamp()} {line}", err=True)
        # Progress within one state (pull percentages) is printed at most once a second.
        now = time.monotonic()
        same = self.states.get(unit) == state.value
        self.states[unit] = state.value
        if not self.quiet and (not same or now - self.printed.get(unit, 0.0) >= 1.0):
            self.printed[unit] = now
            click.echo(f"{_stamp()} {unit:<24} {state.value:<9} {detail}", err=True)
        if not self.settled and (line := render.settled(self.states, now - self.t0)):
            self.settled = True
            click.echo(f"{_stamp()} {line}", err=True)


def _echo(lines: list[str], err: bool = False) -> None:
    for line in lines:
        click.echo(line, err=err)


@click.command()
@manifest_option
@click.option("-d", "--detach", is_flag=True, help="Start the daemon in the background.")
@click.option("--foreground", is_flag=True, help="Run the daemon here (the default; systemd).")
@click.option("--quiet", is_flag=True, hidden=True)
@click.option("--untrusted", is_flag=True, help=UNTRUSTED_HELP + " Kept for reloads.")
@click.option(
    "--replace",
    is_flag=True,
    help="Hand this manifest to a daemon that runs another one on the same state_dir.",
)
def up(
    manifest_file: Path | None,
    detach: bool,
    foreground: bool,
    quiet: bool,
    untrusted: bool,
    replace: bool,
) -> None:
    """Start the daemon with the manifest, or hand the manifest to the running one."""
    import asyncio
    import signal

    from llmsup.client import alive
    from llmsup.daemon import Daemon
    from llmsup.paths import default_manifest_path
    from llmsup.statedir import StateDir

    if detach and foreground:
        raise click.UsageError("-d and --foreground exclude each other")
    given = manifest_file or default_manifest_path()
    path = given.resolve()
    loaded, plan = load(path, gpus=True, untrusted=untrusted)
    there = Target(StateDir.named(loaded.manifest.state_dir), given)
    if alive(there.state.socket):
        if foreground:  # systemd's ExecStart: two daemons on one state_dir is a mistake
            raise DaemonError(
                f"a daemon already answers on {there.state.socket}; stop it (`llmsup down`) first, "
                "or leave out --foreground to hand it this manifest"
            )
        current = Path(call(there, "GET", "/v1/status")["daemon"]["manifest"])
        if current.resolve() != path and not replace:
            arg = shlex.quote(str(given))
            raise DaemonError(
                f"a daemon already runs {current} on {there.state.path}; nothing changed. "
                f"To apply {given} to it instead (changed models restart, missing ones stop): "
                f"`llmsup reload -f {arg}` or `llmsup up --replace -f {arg}`; "
                f"to run both, give {given} a state_dir of its own"
            )
        _echo(render.reload(call(there, "POST", "/v1/reload", {"manifest": str(path)})))
        return
    there.state.check_format()  # a newer llmsup's: refused before its log or lock is written
    if detach:
        _detach(path, there, untrusted)
        return
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    daemon: Daemon | None = None

    def gateway_line() -> str | None:
        return render.gateway_line(daemon.gateway_info()) if daemon is not None else None

    progress = Progress(quiet, gateway_line)
    daemon = Daemon(path, loaded, plan, listener=progress, untrusted=untrusted)
    asyncio.run(daemon.run())
    if daemon.stopped_by == signal.SIGINT:
        click.echo("\nllmsup: interrupted (Ctrl-C); every model stopped", err=True)
        sys.exit(ExitCode.INTERRUPTED)


def _detach(path: Path, there: Target, untrusted: bool) -> None:
    from llmsup import detach

    started = detach.start(path, there.state, untrusted)
    if isinstance(started, detach.Exited):
        click.echo("\n".join(started.tail), err=True)
        raise DaemonError(f"the daemon exited with code {started.code} (log: {started.log})")
    follow = f"llmsup status -f {shlex.quote(str(there.manifest))}"
    click.echo(f"llmsup daemon started (pid {started.pid}); follow it with `{follow}`")
    try:
        line = render.gateway_line(call(there, "GET", "/v1/status").get("gateway"))
    except LlmsupError:
        line = None
    if line:
        click.echo(line)


@click.command()
@manifest_option
def reload(manifest_file: Path | None) -> None:
    """Apply the manifest: only changed models restart; an invalid one changes nothing."""
    body = {"manifest": str(manifest_file.resolve())} if manifest_file else {}
    _echo(render.reload(call(target(manifest_file), "POST", "/v1/reload", body)))


@click.command()
@manifest_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("name", required=False)
def status(manifest_file: Path | None, as_json: bool, name: str | None) -> None:
    """Per model: state, pid, port, uptime, restarts, last exit, health, progress.

    With no daemon: what a killed one left running (exit 3 all the same)."""
    there = target(manifest_file)
    try:
        data = call(there, "GET", "/v1/status")
    except NoDaemonError as e:
        _status_without_daemon(there, e, as_json)
    rows = [r for r in data["models"] if name is None or name in (r["name"], r["unit"])]
    remotes = [r for r in data.get("remotes", []) if name is None or name == r["name"]]
    if name is not None and not rows and not remotes:
        known = ", ".join(r["name"] for r in [*data["models"], *data.get("remotes", [])])
        raise UnknownModel(f"no model named {name!r} (known: {known or 'none'})")
    shown = {**data, "models": rows, "remotes": remotes}
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    _echo(render.status(shown))


def _status_without_daemon(there: Target, e: NoDaemonError, as_json: bool) -> NoReturn:
    with there.state.vacant():
        rows = leftovers.rows(there)
    if as_json:
        out = {"daemon": None, "error": str(e), "leftovers": rows}
        click.echo(json.dumps(out, indent=2))
        sys.exit(ExitCode.NO_DAEMON)
    if not rows:
        raise e
    click.echo(
        f"llmsup: no llmsup daemon is running on {there.state.path}; what it started is left over:",
        err=True,
    )
    _echo(render.leftovers(rows))
    manifest = shlex.quote(str(there.manifest))
    click.echo(
        f"start the daemon again (`llmsup up -f {manifest}`): it adopts those its manifest "
        f"still wants unchanged and stops the others; or stop them all with "
        f"`llmsup down -f {manifest}`",
        err=True,
    )
    sys.exit(ExitCode.NO_DAEMON)


def model_action(action: str, doc: str) -> click.Command:
    """`llmsup start|stop|restart NAME`."""

    @click.command(name=action, help=doc)
    @manifest_option
    @click.argument("name")
    def command(manifest_file: Path | None, name: str) -> None:
        data = call(target(manifest_file), "POST", f"/v1/models/{name}/{action}")
        for r in data["models"]:
            click.echo(f"{r['name']}: {r['state']}")

    return command


MODEL_ACTIONS = [
    model_action("start", "Start a stopped model."),
    model_action("stop", "Stop a model; returns when none of its processes remains."),
    model_action("restart", "Restart a model (also clears FAILED)."),
]


def _alive_pid(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


@click.command()
@manifest_option
@click.option("--timeout", default=900.0, show_default=True, help="Seconds to wait.")
@click.option(
    "--keep-models",
    is_flag=True,
    help="Stop the daemon alone: every model runs on, for the next `llmsup up` to adopt "
    "(an upgrade of llmsup that reloads no model).",
)
def down(manifest_file: Path | None, timeout: float, keep_models: bool) -> None:
    """Stop every model and the daemon; returns when no process is left.

    With no daemon: stops what the state directory's records name (a killed daemon's)."""
    there = target(manifest_file)
    try:
        data = call(there, "POST", "/v1/down", {"keep_models": True} if keep_models else None)
    except NoDaemonError as e:
        if keep_models:
            raise NoDaemonError(f"{e}; with no daemon there is nothing to stop") from None
        with there.state.vacant():
            stopped = leftovers.stop(there)
        if not stopped:
            raise NoDaemonError(f"{e}; nothing it started is left") from None
        click.echo(
            f"llmsup: no llmsup daemon was running on {there.state.path}; "
            "stopped what it left behind:"
        )
        for unit, pids in stopped:
            click.echo(f"  {unit}: " + (f"pid {', '.join(map(str, pids))}" if pids else "gone"))
        return
    pid = int(data["pid"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive_pid(pid):
            if keep_models:
                click.echo("llmsup: daemon exited; the models run on (`llmsup up` adopts them)")
            else:
                click.echo("llmsup: every model stopped, daemon exited")
            return
        time.sleep(0.05)
    raise DaemonError(f"the daemon (pid {pid}) is still stopping after {timeout:g}s")
