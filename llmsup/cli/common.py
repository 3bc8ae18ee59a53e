"""What the commands share: the manifest option, loading and planning, and the
daemon a command talks to (its state directory, its socket, one call to it)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from llmsup.errors import DaemonError, ManifestError, NoDaemonError, StateFormatError

if TYPE_CHECKING:
    from llmsup.manifest import LoadedManifest
    from llmsup.plan import Plan
    from llmsup.statedir import StateDir

F = TypeVar("F", bound=Callable[..., Any])

MANIFEST_HELP = "Manifest (default: $LLMSUP_MANIFEST, ./models.yaml, /etc/llmsup/models.yaml)."
UNTRUSTED_HELP = "Refuse command backends and trust_remote_code (a manifest you did not write)."


def or_global(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """A command's own manifest option, else the one given before the command
    (`llmsup -f FILE logs -f NAME`, as `docker compose -f` does)."""
    if value is not None:
        return value
    given = ctx.find_root().params.get("manifest_file")
    return given if isinstance(given, Path) else None


def manifest_option(fn: F) -> F:
    return click.option(
        "-f",
        "--file",
        "manifest_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        callback=or_global,
        help=MANIFEST_HELP,
    )(fn)


def load(
    manifest_file: Path | None,
    *,
    gpus: bool = False,
    untrusted: bool = False,
    gpu_note: bool = False,
) -> tuple[LoadedManifest, Plan]:
    """Load and plan; with `gpus`, also check the manifest against this host's GPUs
    (`gpu_note`: say so when they cannot be checked); `untrusted` refuses what runs
    code beyond vLLM and Ollama."""
    from llmsup.manifest import default_manifest_path, load_manifest
    from llmsup.plan import make_plan, untrusted_problems

    loaded = load_manifest(manifest_file or default_manifest_path())
    plan = make_plan(loaded)
    problems = list(plan.problems) + (untrusted_problems(loaded) if untrusted else [])
    note = None
    if gpus:
        from llmsup.gpucheck import check_host

        found, note = check_host(loaded)
        problems += found
    problems.sort(key=lambda p: (p.line, p.column))
    if any(p.severity == "error" for p in problems):
        raise ManifestError(problems)
    for p in problems:
        click.echo(str(p), err=True)
    if note and gpu_note:
        click.echo(f"note: {note}", err=True)
    return loaded, plan


@dataclass(frozen=True)
class Target:
    """The daemon a command talks to: its state directory, and the manifest to name."""

    state: StateDir
    manifest: Path

    def no_daemon(self, e: NoDaemonError) -> NoDaemonError:
        arg = shlex.quote(str(self.manifest))
        if self.manifest.exists():
            return NoDaemonError(f"{e}; start one with `llmsup up -f {arg}`")
        return NoDaemonError(f"{e}; start one with `llmsup up -f MANIFEST` (there is no {arg})")


def target(manifest_file: Path | None) -> Target:
    """`-f FILE`; else $LLMSUP_STATE_DIR or $LLMSUP_MANIFEST; else the one daemon that
    runs (several: the default manifest's, or an error that lists them); else what a
    killed daemon left behind; else the default manifest's state directory."""
    from llmsup import running
    from llmsup.paths import default_manifest_path
    from llmsup.statedir import StateDir

    default = default_manifest_path()
    if manifest_file is not None:
        return Target(StateDir.of_file(manifest_file), manifest_file)
    if os.environ.get("LLMSUP_STATE_DIR"):
        return Target(StateDir.default(), default)
    if os.environ.get("LLMSUP_MANIFEST"):
        return Target(StateDir.of_file(default), default)
    live, dead = running.entries()
    if len(live) == 1:
        return Target(live[0].state, Path(live[0].manifest))
    if live:
        mine = StateDir.of_file(default) if default.exists() else None
        chosen = [e for e in live if mine is not None and mine.same(e.state)]
        if chosen:
            return Target(chosen[0].state, Path(chosen[0].manifest))
        listed = "\n".join(f"  pid {e.pid}: {e.manifest} (state {e.state_dir})" for e in live)
        raise DaemonError(
            f"{len(live)} llmsup daemons are running:\n{listed}\n"
            "name the one you mean with -f MANIFEST"
        )
    left = []
    for e in dead:
        if _records(e.state):
            left.append(e)
        else:
            running.forget(e)  # a daemon that is gone and left nothing behind
    if len(left) == 1:
        return Target(left[0].state, Path(left[0].manifest))
    return Target(StateDir.of_file(default), default)


def _records(state: StateDir) -> bool:
    """Does the state directory hold records of launched processes? A newer llmsup's
    directory may: the command that acts on it says it cannot read it."""
    from llmsup import process

    try:
        return bool(process.load_records(state.path))
    except StateFormatError:
        return True


def call(target: Target, method: str, url: str, body: Any = None) -> Any:
    """One request to the daemon; its error (and a manifest's problems) as DaemonError."""
    from llmsup import client

    # A newer llmsup's daemon is not ours to drive (its records, its API): refused
    # before anything is asked of it. A format file we may not read (a member of
    # the control group, a daemon with umask 077) is left for the daemon to judge.
    if os.access(target.state.format_file, os.R_OK):
        target.state.read_format()
    try:
        code, data = client.call(target.state.socket, method, url, body)
    except NoDaemonError as e:
        raise target.no_daemon(e) from None
    if code >= 400:
        if isinstance(data, dict) and data.get("problems"):
            for line in data["problems"]:
                click.echo(line, err=True)
        msg = data.get("error", f"HTTP {code}") if isinstance(data, dict) else f"HTTP {code}"
        raise DaemonError(msg)
    return data
