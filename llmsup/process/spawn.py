"""Starting a server, and the daemon's own helpers.

Every server runs under a shim of its own (`llmsup.shim`), a small process that
writes the server's output to its log and outlives the daemon: a daemon that is
killed or restarted costs no line of output, and a next daemon adopts the server
(`Child.adopt`). The server runs in its own session (so its process group is its
pid), with `LLMSUP_INSTANCE=<state key>:<unit>:<random>` in its environment (not
in the shim's: the shim is no member of the launch, and outlives the server to
drain its output), a private TMPDIR, and (where the daemon may make one) a
cgroup of its own that it joins before it runs its first instruction.
`tracking` says how its processes are found again; we signal only those.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmsup.process import cgroup, litter, tracking
from llmsup.process.child import Child, ShimFiles, readable
from llmsup.process.records import Record
from llmsup.process.stop import clean
from llmsup.process.tracking import MARKER
from llmsup.shim import main as shim

# Never passed to servers: systemd's notify socket belongs to the daemon alone.
SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
SHIM_START = 30.0  # seconds a shim may take to start its server (a loaded host)


async def exit_status(proc: subprocess.Popen[bytes]) -> int:
    """`proc`'s exit status, as soon as it exits: a pidfd tells us at once; without
    pidfds (Linux < 5.3), poll every 50 ms."""
    fd = None
    if proc.poll() is None:
        with contextlib.suppress(AttributeError, OSError):
            fd = os.pidfd_open(proc.pid)
    if fd is not None:
        try:
            await readable(fd)
        finally:
            os.close(fd)
    while (code := proc.poll()) is None:
        await asyncio.sleep(0.05)
    return code


async def spawn_helper(
    argv: list[str], env: dict[str, str], marker: str, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    """Start one of the daemon's own helpers (the gateway): a session of its own (a
    terminal's Ctrl-C is the daemon's to handle), `marker` in its environment (a next
    daemon stops what a killed one left), its output the daemon's, `pass_fds` kept
    open. Registered as ours: orphan reaping leaves its exit to `exit_status`."""

    def popen() -> subprocess.Popen[bytes]:
        with tracking.OWN_LOCK:
            proc = subprocess.Popen(
                argv,
                env={**env, MARKER: marker},
                stdin=subprocess.DEVNULL,
                pass_fds=pass_fds,
                start_new_session=True,
            )
            tracking.own(proc)
        return proc

    return await asyncio.get_running_loop().run_in_executor(None, popen)


def find_executable(name: str, env: Mapping[str, str]) -> str | None:
    return shutil.which(name, path=env.get("PATH", os.defpath))


def child_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment without systemd's variables (and any stale marker), plus `extra`."""
    env = {k: v for k, v in base.items() if k not in SCRUBBED_ENV and k != MARKER}
    env.update(extra)
    return env


def append_line(path: Path, text: str) -> None:
    """One line of llmsup's own in a server's log, stamped (O_APPEND: whole lines
    beside the shim's writes). Raises OSError."""
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(f"--- llmsup {stamp}: {text}\n".encode())


@dataclass(frozen=True)
class LogSpec:
    """Where a server's output goes, and how the shim rotates it."""

    path: Path
    max_bytes: int
    backups: int


def shim_argv(
    argv: list[str], log: LogSpec, files: ShimFiles, instance: str, cg: Path | None
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llmsup.shim",
        "--log",
        str(log.path),
        "--max-bytes",
        str(log.max_bytes),
        "--backups",
        str(log.backups),
        "--pid-file",
        str(files.pid),
        "--exit-file",
        str(files.exit),
        "--status-file",
        str(files.status),
        "--set-env",
        f"{MARKER}={instance}",
        *(["--cgroup", str(cg)] if cg is not None else []),
        "--",
        *argv,
    ]


async def spawn(
    unit: str,
    argv: list[str],
    env: dict[str, str],
    key: str,
    log: LogSpec,
    on_line: Callable[[str], None],
    *,
    state_dir: Path,
    cgroups: Path | None = None,
    fingerprint: str = "",
) -> Child:
    """Start `argv` under a shim of its own, in a new session; its stdout and
    stderr go to `log`. Raises OSError when it cannot be started.

    The server gets a private TMPDIR under `state_dir`; with `cgroups` (from
    `cgroup.prepare`), a cgroup of its own there, which the shim (single-threaded,
    unlike the daemon) moves it into between fork and exec: every process the
    server ever forks is thus inside. The shim runs in a session of its own too
    (a terminal's signals are not for it) and outside the cgroup (stopping the
    tree never kills it: it drains the output, then exits as its server did)."""
    instance = f"{key}:{unit}:{uuid.uuid4().hex[:12]}"
    tmpdir = litter.make_tmpdir(state_dir, instance)
    cg = cgroup.create(cgroups, unit, instance) if cgroups else None
    files = ShimFiles.of(state_dir, instance)
    env = {**env, **litter.tmp_env(tmpdir)}
    run = shim_argv(argv, log, files, instance, cg)
    with contextlib.suppress(OSError):
        append_line(log.path, f"starting {unit}: {argv[0]} (instance {instance})")

    def popen() -> subprocess.Popen[bytes]:
        files.pid.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            run,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        tracking.shim(proc.pid)
        return proc

    # A future, not a task: nothing (not even the loop's shutdown) cancels it while
    # the thread forks, so `_kill_unwanted` always learns of the process.
    started = asyncio.get_running_loop().run_in_executor(None, popen)
    try:
        proc = await asyncio.shield(started)
        server = await _server_of(proc, files)
    except asyncio.CancelledError:
        # A stop while the shim starts: the server starts all the same, and nobody
        # would supervise it. Stop it as soon as it exists.
        started.add_done_callback(lambda f: _kill_unwanted(f, files, cg, tmpdir))
        raise
    except OSError:
        shim_proc = started.result() if started.done() and not started.exception() else None
        if shim_proc is not None and shim_proc.stdout is not None:
            shim_proc.stdout.close()  # the shim itself is gone: the orphan reaper waits for it
        files.remove()
        clean(cg, tmpdir, set())
        raise
    pid, created = int(server["pid"]), float(server["create_time"])
    if cg is not None and pid not in cgroup.procs(cg):
        with contextlib.suppress(OSError):
            cgroup.join(cg, pid)  # the shim could not: early, its first child not yet forked
    record = Record(
        unit,
        instance,
        pid,
        pid,
        created,
        list(argv),
        cgroup=str(cg) if cg else None,
        tmpdir=str(tmpdir),
        known=((pid, created),),
        shim=proc.pid,
        shim_create_time=float(server.get("shim_create_time", 0.0)),
        fingerprint=fingerprint,
    )
    assert proc.stdout is not None
    return Child(record, files, on_line, output=proc.stdout)


async def _server_of(proc: subprocess.Popen[bytes], files: ShimFiles) -> dict[str, Any]:
    """The pid file the shim writes once its server runs; OSError when the shim
    could not start it (the exit file says why) or died first."""
    deadline = time.monotonic() + SHIM_START
    pause = 0.002
    while True:
        data = files.read(files.pid)
        if data is not None and "pid" in data:
            return data
        if proc.poll() is not None or time.monotonic() > deadline:
            failed = files.read(files.exit) or {}
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            why = str(failed.get("error") or f"its log shim exited ({proc.poll()})")
            code = errno.ENOENT if failed.get("code") == shim.NOT_FOUND else errno.EACCES
            raise OSError(code, why)
        await asyncio.sleep(pause)
        pause = min(0.02, pause * 1.5)


def _kill_unwanted(
    started: asyncio.Future[subprocess.Popen[bytes]],
    files: ShimFiles,
    cg: Path | None,
    tmpdir: Path | None,
) -> None:
    """Kill the server a cancelled `spawn` started all the same."""
    if started.cancelled() or started.exception() is not None:
        files.remove()
        clean(cg, tmpdir, set())
        return
    proc = started.result()

    def kill() -> None:
        deadline = time.monotonic() + SHIM_START
        while (data := files.read(files.pid)) is None and proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if data is not None:
            with contextlib.suppress(OSError):
                os.killpg(int(data["pid"]), signal.SIGKILL)  # the server and its children
        if cg is not None:
            cgroup.kill(cg)
        if proc.stdout is not None:
            proc.stdout.close()
        proc.wait()
        files.remove()
        clean(cg, tmpdir, set())

    threading.Thread(target=kill, daemon=True).start()
