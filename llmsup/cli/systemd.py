"""`llmsup systemd print|install`: the unit for this llmsup and manifest."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from llmsup.cli.common import F, load, manifest_option
from llmsup.errors import DaemonError

if TYPE_CHECKING:
    from llmsup.systemd import Options, Unit


def _llmsup_argv() -> list[str]:
    """How systemd should start this very llmsup (its venv, its interpreter)."""
    import shutil

    beside = Path(sys.executable).parent / "llmsup"
    if beside.exists():
        return [str(beside.absolute())]
    found = shutil.which("llmsup")
    return [str(Path(found).absolute())] if found else [sys.executable, "-m", "llmsup.cli"]


@click.group()
def systemd() -> None:
    """Print or install the systemd unit."""


GPU_GROUPS = ("video", "render")  # owners of /dev/dri/* (and /dev/nvidia* on some hosts)


def _unit_path(given: str | None) -> str:
    """The PATH the unit gives llmsup and its servers: `--path`, else this one with
    this interpreter's bin first (a venv or conda env with vllm, activated or not)."""
    if given is not None:
        return given
    here = str(Path(sys.executable).parent.absolute())
    parts = [p for p in os.environ.get("PATH", os.defpath).split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts if here in parts else [here, *parts]))


def _render(
    manifest_file: Path | None, user: bool, path_opt: str | None, user_name: str | None
) -> tuple[Unit, Options]:
    """Load the manifest (a unit for one that is missing or invalid is refused), say
    what the unit's environment lacks, and render the unit."""
    import grp
    import pwd
    import shutil

    from llmsup.paths import default_manifest_path
    from llmsup.plan import missing_executables
    from llmsup.systemd import Options, render

    if user and user_name is not None:
        raise click.UsageError("--user-name is for system units; a --user unit runs as you")
    if user_name is not None:
        try:
            pwd.getpwnam(user_name)
        except KeyError:
            raise click.BadParameter(
                f"no such user {user_name!r}: create it (useradd --system {user_name}) first",
                param_hint="--user-name",
            ) from None
    path = (manifest_file or default_manifest_path()).absolute()
    loaded, plan = load(path)
    state_dir = loaded.manifest.state_dir
    if state_dir is not None and not Path(state_dir).is_absolute():
        where = loaded.problem(("state_dir",), "")
        raise DaemonError(
            f"{where.file}:{where.line}:{where.column}: state_dir {state_dir!r} is relative; "
            "systemd starts llmsup in /: give an absolute path"
        )
    search = _unit_path(path_opt)
    fix = "pass --path with the bin directory of the environment that has it"
    for p in missing_executables(loaded, plan, lambda e: shutil.which(e, path=search), search, fix):
        click.echo(str(p).replace("not on PATH", "not on the unit's PATH"), err=True)
    groups: tuple[str, ...] = ()
    if user_name is not None:
        groups = tuple(g for g in GPU_GROUPS if _group_exists(grp, g))
    options = Options(path=search, user_name=user_name, groups=groups, state_dir=state_dir)
    return render(_llmsup_argv(), str(path), user=user, options=options), options


def _group_exists(grp: Any, name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _unit_options(fn: F) -> F:
    fn = click.option(
        "--path",
        "path_opt",
        default=None,
        help="PATH for llmsup and its servers (default: this one, this Python's bin first).",
    )(fn)
    return click.option(
        "--user-name",
        default=None,
        help="Run the daemon as this user (with the GPU device groups video, render).",
    )(fn)


@systemd.command("print")
@manifest_option
@click.option("--user", is_flag=True, help="A user unit (systemctl --user).")
@_unit_options
def systemd_print(
    manifest_file: Path | None, user: bool, path_opt: str | None, user_name: str | None
) -> None:
    """Print the unit for this llmsup and manifest."""
    click.echo(_render(manifest_file, user, path_opt, user_name)[0].text, nl=False)


@systemd.command("install")
@manifest_option
@click.option("--user", is_flag=True, help="Install for the current user.")
@_unit_options
@click.option("--force", is_flag=True, help="Overwrite a unit that was edited by hand.")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), hidden=True)
def systemd_install(
    manifest_file: Path | None,
    user: bool,
    path_opt: str | None,
    user_name: str | None,
    force: bool,
    unit_dir: Path | None,
) -> None:
    """Write the unit, run daemon-reload, and print the next commands."""
    import shutil
    import subprocess

    from llmsup.paths import default_manifest_path
    from llmsup.systemd import edited_by_hand, unmanaged_state_dir

    path = (manifest_file or default_manifest_path()).absolute()
    unit, options = _render(path, user, path_opt, user_name)
    custom_dir = unit_dir is not None
    if unit_dir is None:
        unit_dir = Path.home() / ".config/systemd/user" if user else Path("/etc/systemd/system")
    target = unit_dir / unit.name
    if target.exists():
        current = target.read_text()
        if current == unit.text:
            click.echo(f"{target} is up to date")
            return
        if edited_by_hand(current) and not force:
            raise DaemonError(
                f"{target} was edited by hand; keep your edits in a drop-in "
                f"(systemctl edit llmsup) or pass --force to overwrite it"
            )
    unit_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(unit.text)
    tmp.replace(target)
    click.echo(f"wrote {target}")
    ctl = ["systemctl", "--user"] if user else ["systemctl"]
    if custom_dir:
        click.echo(f"not reloading systemd: {unit_dir} is not one of its unit directories")
    elif shutil.which("systemctl") and Path("/run/systemd/system").exists():
        r = subprocess.run([*ctl, "daemon-reload"], capture_output=True, text=True)
        if r.returncode != 0:
            click.echo(f"{' '.join(ctl)} daemon-reload failed: {r.stderr.strip()}", err=True)
    else:
        click.echo("systemd is not running here: run `systemctl daemon-reload` on the host")
    unmanaged = None if user else unmanaged_state_dir(options.state_dir)
    if unmanaged is not None:
        owner = f" -o {user_name}" if user_name else ""
        click.echo(f"first: install -d -m 700{owner} {shlex.quote(unmanaged)}  (its state_dir)")
    if not user:
        click.echo(
            "secrets: KEY=value lines in /etc/llmsup/env (chmod 600), ${KEY} in the manifest"
        )
    click.echo(f"next: {' '.join(ctl)} enable --now llmsup")
    click.echo(
        f"      {' '.join(ctl)} status llmsup; journalctl {'--user ' if user else ''}-u llmsup"
    )


@systemd.command("stop-post", hidden=True)
@manifest_option
def systemd_stop_post(manifest_file: Path | None) -> None:
    """The unit's ExecStopPost=: once the daemon is gone, if systemd is stopping the
    unit, stop what is left of its models (the daemon was killed while it stopped
    them), then anything else still in the unit's cgroup; on a restart or after a
    crash, leave them to the next daemon."""
    from llmsup import systemd as sd
    from llmsup.cli import leftovers
    from llmsup.cli.common import target

    verdict = sd.verdict_here(sd.after_exit)
    click.echo(f"llmsup: {verdict.why}")
    if verdict.keep:
        return
    there = target(manifest_file)
    with there.state.vacant():
        for unit, pids in leftovers.stop(there):
            click.echo(
                f"  {unit}: stopped pid {', '.join(map(str, pids))}" if pids else f"  {unit}: gone"
            )
    killed = _sweep_unit_cgroup()
    if killed:
        click.echo(
            f"  killed what else was left in the unit's cgroup: pid {', '.join(map(str, killed))}"
        )


SWEEP_WAIT = 6.0  # seconds for the log shims to drain and exit (their linger is 5 s)


def _sweep_unit_cgroup() -> list[int]:
    """Every process left in this unit's cgroup but this command's: given
    SWEEP_WAIT seconds to exit on its own (log shims drain their server's last
    output), then SIGKILLed. Returns the pids killed."""
    import signal
    import time

    from llmsup.process import cgroup

    try:
        mount = cgroup.cgroup2_mount(Path("/proc/self/mountinfo").read_text())
        own = cgroup.own_cgroup(Path("/proc/self/cgroup").read_text())
    except OSError:
        return []
    if mount is None or own is None or own == "/":
        return []
    here = mount / own.lstrip("/")
    # With Delegate=yes systemd runs this in the unit's `.control` leaf.
    base = here.parent if here.name == ".control" else here

    def others() -> set[int]:
        mine = cgroup.procs(here) if here != base else set()
        return cgroup.procs(base) - mine - {os.getpid()}

    deadline = time.monotonic() + SWEEP_WAIT
    while others() and time.monotonic() < deadline:
        time.sleep(0.1)
    killed: set[int] = set()
    for _ in range(50):  # what forks meanwhile is killed too
        left = others()
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.add(pid)
        time.sleep(0.1)
    return sorted(killed)
