"""The `llmsup` command line: parse, call, format. No decisions here.

Heavy modules (pydantic, aiohttp, psutil) are imported inside commands so that
`llmsup --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from llmsup import __version__
from llmsup.errors import DaemonError, ExitCode, LlmsupError, ManifestError, NoDaemonError

if TYPE_CHECKING:
    from llmsup.manifest import LoadedManifest
    from llmsup.plan import Plan
    from llmsup.systemd import Options, Unit

F = TypeVar("F", bound=Callable[..., Any])


MANIFEST_HELP = "Manifest (default: $LLMSUP_MANIFEST, ./models.yaml, /etc/llmsup/models.yaml)."


def _or_global(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
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
        callback=_or_global,
        help=MANIFEST_HELP,
    )(fn)


def _load(
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


UNTRUSTED_HELP = "Refuse command backends and trust_remote_code (a manifest you did not write)."


@main.command()
@manifest_option
@click.option("--untrusted", is_flag=True, help=UNTRUSTED_HELP)
def check(manifest_file: Path | None, untrusted: bool) -> None:
    """Validate the manifest, its cross-model rules, and its GPUs; exit 2 if invalid."""
    import shutil

    from llmsup.plan import missing_executables

    loaded, plan = _load(manifest_file, gpus=True, untrusted=untrusted, gpu_note=True)
    search = os.environ.get("PATH", os.defpath)
    absent = missing_executables(loaded, plan, lambda exe: shutil.which(exe, path=search), search)
    for p in absent:
        click.echo(str(p), err=True)
    if plan.vllm_flags is not None and not plan.vllm_flags.exact:
        click.echo(f"note: vLLM flags: {plan.vllm_flags.why}", err=True)
    n = len(loaded.manifest.models)
    warnings = len(plan.problems) + len(absent)
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
    table = the_plan.vllm_flags
    if table is not None and any(e["backend"] == "vllm" for e in entries):
        click.echo(f"# vLLM flags checked against {table.version}'s: {table.why}\n")
    shown: set[str] = set()
    for i, e in enumerate(entries, 1):
        if e["unit"] in shown:
            click.echo(f"# {i}. {e['name']} ({e['backend']}): served by {e['unit']}'s server\n")
            continue
        shown.add(e["unit"])
        after = f", after {', '.join(e['after'])} is ready" if e["after"] else ""
        if e.get("swapped_with"):
            after += f", swapped with {', '.join(e['swapped_with'])} (never together)"
        click.echo(f"# {i}. {e['name']} ({e['backend']}) on {e['host']}:{e['port']}{after}")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in e["env"].items())
        cmd = shlex.join(e["argv"])
        click.echo(f"{env} \\\n  {cmd}" if env else cmd)
        for step in e["steps"]:
            click.echo(f"#   then {step}")
        click.echo("")


# ------------------------------------------------------------ the daemon


@dataclass(frozen=True)
class _Target:
    """The daemon a command talks to: its state directory, and the manifest to name."""

    state_dir: Path
    manifest: Path

    @property
    def sock(self) -> Path:
        from llmsup.paths import socket_path

        return socket_path(self.state_dir)

    def no_daemon(self, e: NoDaemonError) -> NoDaemonError:
        arg = shlex.quote(str(self.manifest))
        if self.manifest.exists():
            return NoDaemonError(f"{e}; start one with `llmsup up -f {arg}`")
        return NoDaemonError(f"{e}; start one with `llmsup up -f MANIFEST` (there is no {arg})")


def _target(manifest_file: Path | None) -> _Target:
    """`-f FILE`; else $LLMSUP_STATE_DIR or $LLMSUP_MANIFEST; else the one daemon that
    runs (several: the default manifest's, or an error that lists them); else what a
    killed daemon left behind; else the default manifest's state directory."""
    from llmsup import running
    from llmsup.paths import default_manifest_path, default_state_dir, state_dir_from_file

    default = default_manifest_path()
    if manifest_file is not None:
        return _Target(state_dir_from_file(manifest_file), manifest_file)
    if os.environ.get("LLMSUP_STATE_DIR"):
        return _Target(default_state_dir(), default)
    if os.environ.get("LLMSUP_MANIFEST"):
        return _Target(state_dir_from_file(default), default)
    live, dead = running.entries()
    if len(live) == 1:
        return _Target(Path(live[0].state_dir), Path(live[0].manifest))
    if live:
        mine = state_dir_from_file(default).resolve() if default.exists() else None
        chosen = [e for e in live if Path(e.state_dir).resolve() == mine]
        if chosen:
            return _Target(Path(chosen[0].state_dir), Path(chosen[0].manifest))
        listed = "\n".join(f"  pid {e.pid}: {e.manifest} (state {e.state_dir})" for e in live)
        raise DaemonError(
            f"{len(live)} llmsup daemons are running:\n{listed}\n"
            "name the one you mean with -f MANIFEST"
        )
    left = []
    for e in dead:
        if _records(Path(e.state_dir)):
            left.append(e)
        else:
            running.forget(e)  # a daemon that is gone and left nothing behind
    if len(left) == 1:
        return _Target(Path(left[0].state_dir), Path(left[0].manifest))
    return _Target(state_dir_from_file(default), default)


def _records(state_dir: Path) -> bool:
    """Does the state directory hold records of launched processes?"""
    from llmsup import process

    return bool(process.load_records(state_dir))


def _call(target: _Target, method: str, url: str, body: Any = None) -> Any:
    from llmsup.client import call

    try:
        code, data = call(target.sock, method, url, body)
    except NoDaemonError as e:
        raise target.no_daemon(e) from None
    if code >= 400:
        if isinstance(data, dict) and data.get("problems"):
            for line in data["problems"]:
                click.echo(line, err=True)
        msg = data.get("error", f"HTTP {code}") if isinstance(data, dict) else f"HTTP {code}"
        raise DaemonError(msg)
    return data


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


class _Progress:
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
        busy = {"WAITING", "WAITING_GPU", "STARTING", "LOADING", "BACKOFF"}
        if not self.settled and self.states and not busy & set(self.states.values()):
            self.settled = True
            ready = sum(v == "READY" for v in self.states.values())
            failed = sum(v == "FAILED" for v in self.states.values())
            # With nothing launched the daemon says why and exits: no "supervising".
            going = "; supervising (Ctrl-C stops all)" if failed < len(self.states) else ""
            click.echo(
                f"{_stamp()} {ready} ready, {failed} failed, "
                f"after {time.monotonic() - self.t0:.1f}s{going}",
                err=True,
            )


@main.command()
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
    from llmsup.daemon import Daemon, state_dir_of
    from llmsup.paths import default_manifest_path

    if detach and foreground:
        raise click.UsageError("-d and --foreground exclude each other")
    given = manifest_file or default_manifest_path()
    path = given.resolve()
    loaded, plan = _load(path, gpus=True, untrusted=untrusted)
    target = _Target(state_dir_of(loaded), given)
    if alive(target.sock):
        if foreground:  # systemd's ExecStart: two daemons on one state_dir is a mistake
            raise DaemonError(
                f"a daemon already answers on {target.sock}; stop it (`llmsup down`) first, "
                "or leave out --foreground to hand it this manifest"
            )
        current = Path(_call(target, "GET", "/v1/status")["daemon"]["manifest"])
        if current.resolve() != path and not replace:
            arg = shlex.quote(str(given))
            raise DaemonError(
                f"a daemon already runs {current} on {target.state_dir}; nothing changed. "
                f"To apply {given} to it instead (changed models restart, missing ones stop): "
                f"`llmsup reload -f {arg}` or `llmsup up --replace -f {arg}`; "
                f"to run both, give {given} a state_dir of its own"
            )
        result = _call(target, "POST", "/v1/reload", {"manifest": str(path)})
        _print_reload(result)
        return
    if detach:
        _detach(path, target, untrusted)
        return
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    daemon: Daemon | None = None

    def gateway_line() -> str | None:
        return _gateway_line(daemon.gateway_info()) if daemon is not None else None

    progress = _Progress(quiet, gateway_line)
    daemon = Daemon(path, loaded, plan, listener=progress, untrusted=untrusted)
    asyncio.run(daemon.run())
    if daemon.stopped_by == signal.SIGINT:
        click.echo("\nllmsup: interrupted (Ctrl-C); every model stopped", err=True)
        sys.exit(ExitCode.INTERRUPTED)


def _gateway_line(info: dict[str, Any] | None) -> str | None:
    """`gateway: http://127.0.0.1:9000/v1 (listening on 0.0.0.0:9000), API key required`"""
    if info is None:
        return None
    where = f"{info['host']}:{info['port']}"
    if not info["listening"]:
        return f"gateway: not listening on {where}"
    keys = (
        "API key required" if info["keys_required"] else "no API key: open to anyone who reaches it"
    )
    return f"gateway: {info['url']} (listening on {where}), {keys}"


def _detach(path: Path, target: _Target, untrusted: bool) -> None:
    import subprocess

    from llmsup.client import alive

    state_dir, sock = target.state_dir, target.sock
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = state_dir / "daemon.log"
    with open(log, "ab") as out:
        start = out.tell()  # the log is appended to: show this start's lines only
        proc = subprocess.Popen(
            [
                *[sys.executable, "-m", "llmsup.cli", "up", "--foreground", "--quiet"],
                *(["--untrusted"] if untrusted else []),
                *["-f", str(path)],
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if alive(sock) and _launch_under_way(target):
            follow = f"llmsup status -f {shlex.quote(str(target.manifest))}"
            click.echo(f"llmsup daemon started (pid {proc.pid}); follow it with `{follow}`")
            with contextlib.suppress(LlmsupError):
                line = _gateway_line(_call(target, "GET", "/v1/status").get("gateway"))
                if line:
                    click.echo(line)
            return
        if proc.poll() is not None:
            with open(log, "rb") as f:
                f.seek(start)
                tail = f.read().decode(errors="replace").splitlines()[-40:]
            click.echo("\n".join(tail), err=True)
            raise DaemonError(f"the daemon exited with code {proc.returncode} (log: {log})")
        time.sleep(0.05)
    raise DaemonError(f"the daemon did not answer within 60s (log: {log})")


def _launch_under_way(target: _Target) -> bool:
    """The daemon got a server going (or has none to start now); False while its
    launches are pending and when none could be launched (it then exits, saying why)."""
    try:
        return bool(_call(target, "GET", "/v1/status").get("launch", "under way") == "under way")
    except LlmsupError:
        return False


def _print_reload(result: dict[str, list[str]]) -> None:
    for key in ("added", "removed", "restarted", "unchanged"):
        if result.get(key):
            click.echo(f"{key}: {', '.join(result[key])}")


@main.command()
@manifest_option
def reload(manifest_file: Path | None) -> None:
    """Apply the manifest: only changed models restart; an invalid one changes nothing."""
    target = _target(manifest_file)
    body = {"manifest": str(manifest_file.resolve())} if manifest_file else {}
    _print_reload(_call(target, "POST", "/v1/reload", body))


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@main.command()
@manifest_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("name", required=False)
def status(manifest_file: Path | None, as_json: bool, name: str | None) -> None:
    """Per model: state, pid, port, uptime, restarts, last exit, health, progress.

    With no daemon: what a killed one left running (exit 3 all the same)."""
    target = _target(manifest_file)
    try:
        data = _call(target, "GET", "/v1/status")
    except NoDaemonError as e:
        _status_without_daemon(target, e, as_json)
    rows = [r for r in data["models"] if name is None or name in (r["name"], r["unit"])]
    if name is not None and not rows:
        known = ", ".join(r["name"] for r in data["models"])
        raise DaemonError(f"no model named {name!r} (known: {known or 'none'})")
    if as_json:
        click.echo(json.dumps({**data, "models": rows}, indent=2))
        return
    head = (
        "NAME", "BACKEND", "STATE", "PID", "PORT", "UPTIME", "RESTARTS", "HEALTH", "GPU MEM",
        "DETAIL",
    )  # fmt: skip
    table = [head]
    for r in rows:
        health = "-" if r["health_latency_ms"] is None else f"{r['health_latency_ms']:.0f}ms"
        if r["state"] == "FAILED":  # why, not the last load step it reached
            detail = r["reason"] or r["detail"]
        else:
            detail = r["progress"] or r["detail"]
        if r["last_exit"] and r["state"] != "FAILED":
            detail = f"{detail} (last: {r['last_exit']})" if detail else f"last: {r['last_exit']}"
        table.append(
            (
                r["name"],
                r["backend"],
                r["state"],
                str(r["pid"] or "-"),
                str(r["port"]),
                _fmt_age(r["uptime"]),
                str(r["restarts"]),
                health,
                _fmt_gpu(r.get("gpu_memory")),
                detail,
            )
        )
    _print_table(table)
    if data.get("gpu_note") and any(r.get("gpu_memory") is not None for r in rows):
        click.echo(f"note: {data['gpu_note']}")  # GPUs were seen, and are no longer
    if line := _gateway_line(data.get("gateway")):
        click.echo(line)
    for r in rows:
        if r["state"] == "FAILED" and r["tail"]:
            click.echo(f"\n{r['name']}: last log lines:")
            for line in r["tail"][-10:]:
                click.echo(f"  {line}")


def _print_table(table: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one as it comes."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        click.echo(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )


@contextlib.contextmanager
def _no_daemon_holds(target: _Target) -> Iterator[None]:
    """Hold the state directory's daemon lock: no daemon runs there, not even one
    that does not answer, and none starts until we are done."""
    import fcntl

    lock = target.state_dir / "daemon.lock"
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        yield  # no daemon ever ran there
        return
    except PermissionError:
        raise DaemonError(f"permission denied on {lock}: run as the daemon's user") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise DaemonError(
                f"a daemon (pid {pid}) holds {target.state_dir} but does not answer on "
                f"{target.sock}: it may be starting, or stuck; retry in a moment, "
                f"or stop it with `kill {pid}`"
            ) from None
        yield
    finally:
        os.close(fd)


def _leftovers(target: _Target) -> list[dict[str, Any]]:
    """What the state directory's records name: per launch, its processes still alive."""
    from llmsup import process

    out = []
    for rec in process.load_records(target.state_dir):
        pids = sorted(p.pid for p in process.members(rec))
        out.append({"unit": rec.unit, "pid": rec.pid, "alive": pids, "argv": list(rec.argv)})
    return out


def _status_without_daemon(target: _Target, e: NoDaemonError, as_json: bool) -> NoReturn:
    with _no_daemon_holds(target):
        rows = _leftovers(target)
    if as_json:
        out = {"daemon": None, "error": str(e), "leftovers": rows}
        click.echo(json.dumps(out, indent=2))
        sys.exit(ExitCode.NO_DAEMON)
    if not rows:
        raise e
    table: list[tuple[str, ...]] = [("UNIT", "PID", "STATE", "ALIVE", "COMMAND")]
    for r in rows:
        alive = " ".join(map(str, r["alive"])) or "none"
        state = "unsupervised" if r["alive"] else "gone"
        table.append((r["unit"], str(r["pid"]), state, alive, shlex.join(r["argv"])[:100]))
    click.echo(
        f"llmsup: no llmsup daemon is running on {target.state_dir}; what it started is left over:",
        err=True,
    )
    _print_table(table)
    manifest = shlex.quote(str(target.manifest))
    click.echo(
        f"stop them with `llmsup down -f {manifest}`, "
        f"or start the daemon again (`llmsup up -f {manifest}`): it stops them first",
        err=True,
    )
    sys.exit(ExitCode.NO_DAEMON)


def _fmt_gpu(held: dict[str, int] | None) -> str:
    """`0:71.2G 1:71.2G`, `-` when nothing is held, `n/a` without GPU information."""
    if held is None:
        return "n/a"
    if not held:
        return "-"
    return " ".join(f"{i}:{b / 2**30:.1f}G" for i, b in sorted(held.items()))


@main.command()
@manifest_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gpus(manifest_file: Path | None, as_json: bool) -> None:
    """Each GPU, its memory, and its processes: which model, an orphan, or foreign."""
    from llmsup import gpu, gpucheck
    from llmsup.client import call

    try:
        snap = gpu.source_from_env().snapshot()
    except gpu.GpuUnavailable as e:
        if as_json:
            click.echo(json.dumps({"gpus": [], "processes": [], "note": str(e)}, indent=2))
        else:
            click.echo(f"no GPU information: {e}")
        return
    current: dict[str, str] = {}
    owners: dict[int, str] = {}
    orphans: dict[int, str] = {}
    daemon_note = ""
    try:
        _, data = call(_target(manifest_file).sock, "GET", "/v1/status", timeout=5.0)
        current = {r["instance"]: r["unit"] for r in data["models"] if r.get("instance")}
        owners = {pid: r["unit"] for r in data["models"] for pid in r.get("pids", [])}
        owners = gpucheck.with_descendants(owners)
    except LlmsupError:
        if snap.processes:
            daemon_note = "no llmsup daemon answers: llmsup's processes show as orphans"
            with contextlib.suppress(LlmsupError, OSError):
                orphans = gpucheck.recorded(_target(manifest_file).state_dir)
    procs: list[dict[str, Any]] = []
    for p in snap.processes:
        info = gpu.process_info(p.pid)
        procs.append(
            {
                "gpu": p.gpu_index,
                "pid": p.pid,
                "used_memory": p.used_memory,
                "owner": gpucheck.label(p.pid, gpucheck.marker_of(p.pid), current, owners, orphans),
                "user": info[0] if info else None,
                "command": info[1] if info else None,
            }
        )
    if as_json:
        out = {
            "gpus": [g.__dict__ for g in snap.gpus],
            "processes": procs,
            "notes": [*snap.notes, *([daemon_note] if daemon_note else [])],
        }
        click.echo(json.dumps(out, indent=2))
        return
    for g in snap.gpus:
        util = "-" if g.utilization is None else f"{g.utilization}%"
        temp = "-" if g.temperature is None else f"{g.temperature}C"
        click.echo(
            f"GPU {g.index}  {g.name}  {gpu.fmt_bytes(g.memory_used)} / "
            f"{gpu.fmt_bytes(g.memory_total)} used, {gpu.fmt_bytes(g.memory_free)} free  "
            f"util {util}  {temp}  {g.uuid}"
        )
        for row in [x for x in procs if x["gpu"] == g.index]:
            held = row["used_memory"]
            amount = "?" if held is None else gpu.fmt_bytes(held)
            who = f"{row['user']}: {row['command']}" if row["user"] else "not visible to this user"
            click.echo(f"    pid {row['pid']:<8} {amount:>10}  {row['owner']:<24} {who[:90]}")
    for n in [*snap.notes, *([daemon_note] if daemon_note else [])]:
        click.echo(f"note: {n}")


def _model_action(action: str, manifest_file: Path | None, name: str) -> None:
    data = _call(_target(manifest_file), "POST", f"/v1/models/{name}/{action}")
    for r in data["models"]:
        click.echo(f"{r['name']}: {r['state']}")


for _action, _doc in (
    ("start", "Start a stopped model."),
    ("stop", "Stop a model; returns when none of its processes remains."),
    ("restart", "Restart a model (also clears FAILED)."),
):

    def _make(action: str, doc: str) -> None:
        @main.command(name=action, help=doc)
        @manifest_option
        @click.argument("name")
        def _cmd(manifest_file: Path | None, name: str) -> None:
            _model_action(action, manifest_file, name)

    _make(_action, _doc)


def _alive_pid(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


@main.command()
@manifest_option
@click.option("--timeout", default=900.0, show_default=True, help="Seconds to wait.")
def down(manifest_file: Path | None, timeout: float) -> None:
    """Stop every model and the daemon; returns when no process is left.

    With no daemon: stops what the state directory's records name (a killed daemon's)."""
    target = _target(manifest_file)
    try:
        data = _call(target, "POST", "/v1/down")
    except NoDaemonError as e:
        with _no_daemon_holds(target):
            stopped = _stop_leftovers(target)
        if not stopped:
            raise NoDaemonError(f"{e}; nothing it started is left") from None
        click.echo(
            f"llmsup: no llmsup daemon was running on {target.state_dir}; "
            "stopped what it left behind:"
        )
        for unit, pids in stopped:
            click.echo(f"  {unit}: " + (f"pid {', '.join(map(str, pids))}" if pids else "gone"))
        return
    pid = int(data["pid"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive_pid(pid):
            click.echo("llmsup: every model stopped, daemon exited")
            return
        time.sleep(0.05)
    raise DaemonError(f"the daemon (pid {pid}) is still stopping after {timeout:g}s")


def _stop_leftovers(target: _Target) -> list[tuple[str, list[int]]]:
    """Stop every process the records name, and any other carrying the state dir's
    marker, each with its model's stop_timeout; (unit, pids that were alive)."""
    import asyncio

    from llmsup import process

    key = process.state_key(target.state_dir) + ":"
    found = [(rec, process.members(rec)) for rec in process.load_records(target.state_dir)]
    known = {p.pid for _, procs in found for p in procs}
    strays = [p for p in process.marked_with(key) if p.pid not in known]
    if not found and not strays:
        return []
    grace = _stop_timeouts(target.manifest)

    async def stop_all() -> None:
        async def stop(rec: process.Record) -> None:
            await process.stop(rec, grace(rec.unit))  # and its cgroup, TMPDIR, shared memory
            process.drop_record(target.state_dir, rec)

        await asyncio.gather(*(stop(rec) for rec, _ in found))
        await process.terminate(lambda: process.marked_with(key), grace(""))

    asyncio.run(stop_all())
    out = [(rec.unit, sorted(p.pid for p in procs)) for rec, procs in found]
    return out + ([("unrecorded", sorted(p.pid for p in strays))] if strays else [])


def _stop_timeouts(manifest: Path) -> Callable[[str], float]:
    """The manifest's stop_timeout per unit; 30 s (its default) if it cannot be read."""
    from llmsup.manifest import load_manifest

    try:
        return load_manifest(manifest).manifest.stop_timeout
    except (LlmsupError, OSError):
        return lambda _unit: 30.0


@main.command()
@click.option(
    "--file",
    "manifest_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    callback=_or_global,
    help="Manifest (to find the state directory); `llmsup -f FILE logs` works too.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C ends).")
@click.option("-n", "lines", default=50, show_default=True, help="Lines to show.")
@click.argument("name")
def logs(manifest_file: Path | None, follow: bool, lines: int, name: str) -> None:
    """Show a model's server log (stdout and stderr)."""
    from llmsup.client import call

    target = _target(manifest_file)
    logs_dir = target.state_dir / "logs"
    path = logs_dir / f"{name}.log"
    try:
        _, data = call(target.sock, "GET", "/v1/status", timeout=5.0)
        row = next((r for r in data["models"] if name in (r["name"], r["unit"])), None)
        if row is None:
            known = ", ".join(r["name"] for r in data["models"]) or "none"
            raise DaemonError(f"no model named {name!r} (known: {known})")
        path = Path(row["log"])
    except NoDaemonError:
        pass  # the log files outlive the daemon
    if not path.exists():
        known = ", ".join(sorted(p.name[:-4] for p in logs_dir.glob("*.log"))) or "none"
        raise DaemonError(
            f"no log for {name!r} in {logs_dir} (logs there: {known}); "
            f"is {target.manifest} the manifest that ran it? Name it with --file"
        )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one stops following
        _print_log(path, lines, follow)


def _print_log(path: Path, lines: int, follow: bool) -> None:
    with open(path, "rb") as f:
        tail = f.read().splitlines()[-lines:] if lines > 0 else []
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


# ------------------------------------------------------------ systemd


def _llmsup_argv() -> list[str]:
    """How systemd should start this very llmsup (its venv, its interpreter)."""
    import shutil

    beside = Path(sys.executable).parent / "llmsup"
    if beside.exists():
        return [str(beside.absolute())]
    found = shutil.which("llmsup")
    return [str(Path(found).absolute())] if found else [sys.executable, "-m", "llmsup.cli"]


@main.group()
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
    loaded, plan = _load(path)
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


@main.command()
def schema() -> None:
    """Print the manifest's JSON Schema (for editors)."""
    from llmsup.manifest import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


if __name__ == "__main__":
    main()
