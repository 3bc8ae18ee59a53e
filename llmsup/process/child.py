"""Starting a server, watching it, and stopping its whole tree.

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
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import psutil

from llmsup.process import cgroup, litter, tracking
from llmsup.process.records import SHIM_SUFFIXES, Record, save_record
from llmsup.process.tracking import MARKER, SAME_START, members
from llmsup.shim import main as shim
from llmsup.state import EXIT_UNKNOWN
from llmsup.statedir import StateDir

# Never passed to servers: systemd's notify socket belongs to the daemon alone.
SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
TRACK_INTERVAL = 2.0  # seconds between snapshots of the servers' trees
SHIM_START = 30.0  # seconds a shim may take to start its server (a loaded host)
EXIT_FILE_WAIT = 2.0  # seconds to wait for a live shim to write the exit status
FOLLOW_PAUSE = 0.25  # seconds between reads of an adopted server's log


@dataclass(frozen=True)
class ShimFiles:
    """What a launch's shim writes beside its record (see `llmsup.shim.main`)."""

    pid: Path
    exit: Path
    status: Path

    @classmethod
    def of(cls, state_dir: Path, instance: str) -> ShimFiles:
        name = instance.replace(":", "_")
        return cls(*(StateDir(state_dir).records / f"{name}{s}" for s in SHIM_SUFFIXES))

    def read(self, path: Path) -> dict[str, Any] | None:
        """One of the files, or None while it is not (wholly) there."""
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def remove(self) -> None:
        for path in (self.pid, self.exit, self.status):
            path.unlink(missing_ok=True)


class Child:
    """A running server: its record, its shim's files, and its output.

    Started by this daemon (`spawn`): the output comes from the shim's stdout, a
    copy of what the shim writes to the log. Adopted from a daemon that is gone
    (`adopt`): the shim's copy went to that daemon; the output is read from the
    log as it grows. Either way the lines feed `on_line` and `tail`.

    The server is the shim's child, not ours: its exit is seen through a pidfd
    (or, before Linux 5.3, by polling), and its status read from the exit file
    the shim writes. `record` grows as `track` sees the tree; `pids` are the live
    members the last snapshot found.
    """

    def __init__(
        self,
        record: Record,
        files: ShimFiles,
        on_line: Callable[[str], None],
        output: IO[bytes] | None = None,
        follow: Path | None = None,
    ) -> None:
        self.record = record
        self.files = files
        self.pids: set[int] = {record.pid}
        self.tail: deque[str] = deque(maxlen=20)
        self.code: int | None = None  # the exit status, once known
        self._on_line = on_line
        self._output = output
        self._gone = asyncio.Event()
        self._fd = _pidfd(record.pid, record.create_time)  # None: gone already, or polled
        self.pump = asyncio.create_task(self._pump(output) if output else self._follow(follow))
        self._watch = asyncio.create_task(self._wait_exit())

    @classmethod
    def adopt(
        cls, record: Record, state_dir: Path, log: Path, on_line: Callable[[str], None]
    ) -> Child:
        """A server a daemon before us started, still running (`verify` says so)."""
        return cls(record, ShimFiles.of(state_dir, record.instance), on_line, follow=log)

    @property
    def pid(self) -> int:
        return self.record.pid

    @property
    def running(self) -> bool:
        return self.code is None

    def log_status(self) -> tuple[int, str]:
        """Bytes of output the log dropped (a full disk), and the warning while it does."""
        data = self.files.read(self.files.status) or {}
        return int(data.get("dropped_bytes", 0)), str(data.get("warning", ""))

    def _lines(self, chunk: bytes, partial: bytes) -> bytes:
        lines = (partial + chunk).split(b"\n")
        for raw in lines[:-1]:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self.tail.append(line)
            self._on_line(line)
        return lines[-1][-4096:]

    async def _pump(self, output: IO[bytes]) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), output
        )
        partial = b""
        try:
            while chunk := await reader.read(65536):
                partial = self._lines(chunk, partial)
        finally:
            transport.close()

    async def _follow(self, path: Path | None) -> None:
        """The log from its end at adoption, as it grows (and rotates), until the
        server is gone and what it wrote is read. Reads of a local file that has
        grown by a few lines take microseconds: done in the loop."""
        if path is None:
            return
        f = _open_at_end(path)
        partial = b""
        try:
            while True:
                chunk = f.read(65536) if f is not None else b""
                if chunk:
                    partial = self._lines(chunk, partial)
                    await asyncio.sleep(0)  # a server that writes fast: others go on
                    continue
                if self._gone.is_set():
                    return
                if f is None or _rotated(path, f):
                    if f is not None:
                        f.close()
                    f = _open(path)
                    if f is not None:
                        continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._gone.wait(), FOLLOW_PAUSE)
        finally:
            if f is not None:
                f.close()

    async def _wait_exit(self) -> None:
        try:
            await _until_gone(self.record.pid, self.record.create_time, self._fd)
            self.code = await self._exit_code()
        finally:
            self._gone.set()
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def _exit_code(self) -> int:
        """What the shim wrote of the exit; EXIT_UNKNOWN if it was gone and could not."""
        deadline = time.monotonic() + EXIT_FILE_WAIT
        while True:
            code = _exit_code(self.files, self.record)
            if code is not None:
                return code
            shim_alive = _alive(self.record.shim, self.record.shim_create_time)
            if not shim_alive or time.monotonic() >= deadline:
                return EXIT_UNKNOWN
            await asyncio.sleep(0.01)

    async def exited(self) -> int:
        """The exit status of the server process itself, as soon as it exits.

        Not its output's end: an orphaned vLLM EngineCore keeps the pipe open."""
        await asyncio.shield(self._watch)
        assert self.code is not None
        return self.code

    async def wait(self) -> int:
        """Until the process has exited and its output is drained."""
        code = await self.exited()
        await asyncio.shield(self.pump)
        return code

    async def close(self) -> None:
        """Stop reading its output (the shim goes on writing the log) and forget it."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.pump), 2.0 if self._gone.is_set() else 0)
        for task in (self.pump, self._watch):
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if self._output is not None:
            self._output.close()  # a no-op unless the pump was cancelled before it began

    async def detach(self) -> None:
        """Leave the server running (the daemon exits for a successor to adopt it)."""
        for task in (self.pump, self._watch):
            task.cancel()
            await asyncio.wait({task})
        if self._output is not None:
            self._output.close()  # the shim's copy ends (EPIPE); its log goes on


def _open(path: Path) -> IO[bytes] | None:
    try:
        return open(path, "rb")
    except OSError:
        return None


def _open_at_end(path: Path) -> IO[bytes] | None:
    f = _open(path)
    if f is not None:
        f.seek(0, os.SEEK_END)
    return f


def _rotated(path: Path, f: IO[bytes]) -> bool:
    try:
        return path.stat().st_ino != os.fstat(f.fileno()).st_ino
    except OSError:
        return False


def _alive(pid: int | None, created: float) -> bool:
    """Whether `pid` is still the process that started at `created` (True when it
    cannot be told: out of descriptors, /proc cannot be read)."""
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and abs(p.create_time() - created) < SAME_START
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except (psutil.Error, OSError):
        return True


def _pidfd(pid: int, created: float) -> int | None:
    """A pidfd of the process `pid` that started at `created`, held for its whole
    life: its exit is then seen even when the daemon is out of descriptors. None
    without pidfds (Linux < 5.3), or when it is not that process (any more)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    if not _alive(pid, created):  # opened, then checked: the pid was not reused meanwhile
        os.close(fd)
        return None
    return fd


async def _until_gone(pid: int, created: float, fd: int | None) -> None:
    """Return once the process `pid` that started at `created` has exited: its pidfd
    `fd` tells us at once; without one, poll every 50 ms."""
    if fd is not None:
        loop = asyncio.get_running_loop()
        gone = loop.create_future()

        def on_exit() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(fd, on_exit)
        try:
            await gone
        finally:
            loop.remove_reader(fd)
        return
    while _alive(pid, created):
        await asyncio.sleep(0.05)


NOT_RUNNING = "not running"


def verify(record: Record) -> str | None:
    """Why the server `record` names cannot be adopted (None: it can): it must be
    running under its shim, the very processes the record names (pid and start
    time), and be ours (in its cgroup, or carrying its marker). A pid the kernel
    gave to another process is never adopted, nor signalled."""
    if record.shim is None:
        return "started without a log shim (by an older llmsup): its output went to the daemon"
    if not _alive(record.pid, record.create_time):
        return NOT_RUNNING
    if not _alive(record.shim, record.shim_create_time):
        return "its log shim is gone"
    try:
        p = psutil.Process(record.pid)
        in_cgroup = bool(record.cgroup) and record.pid in cgroup.procs(Path(record.cgroup or ""))
        if not in_cgroup and p.environ().get(MARKER) != record.instance:
            return "neither in its cgroup nor marked as ours"
        if p.ppid() != record.shim:
            return "no longer the shim's child"
    except (psutil.Error, OSError):
        return NOT_RUNNING
    return None


def exit_code_of(state_dir: Path, record: Record) -> int | None:
    """How a launch's server ended, as its shim wrote it (None: not written)."""
    return _exit_code(ShimFiles.of(state_dir, record.instance), record)


def _exit_code(files: ShimFiles, record: Record) -> int | None:
    data = files.read(files.exit)
    if data is None or data.get("pid") != record.pid:
        return None
    return -int(data["signal"]) if "signal" in data else int(data.get("code", 0))


async def exit_status(proc: subprocess.Popen[bytes]) -> int:
    """`proc`'s exit status, as soon as it exits: a pidfd tells us at once; without
    pidfds (Linux < 5.3), poll every 50 ms."""
    loop = asyncio.get_running_loop()
    fd = None
    if proc.poll() is None:
        with contextlib.suppress(AttributeError, OSError):
            fd = os.pidfd_open(proc.pid)
    if fd is not None:
        gone: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(fd, on_exit)
        try:
            await gone
        finally:
            loop.remove_reader(fd)
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
        if started.done() and not started.exception():
            started.result().stdout.close()  # type: ignore[union-attr]
        files.remove()
        _clean(cg, tmpdir, set())
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
        _clean(cg, tmpdir, set())
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
        _clean(cg, tmpdir, set())

    threading.Thread(target=kill, daemon=True).start()


def _clean(
    cg: Path | None, tmpdir: Path | str | None, shm: set[str], since: float | None = None
) -> None:
    """Once a tree is gone: its cgroup, its TMPDIR, its shared memory."""
    if cg is not None:
        deadline = time.monotonic() + 5.0
        while not cgroup.remove(cg) and time.monotonic() < deadline:
            time.sleep(0.05)  # populated until the kernel has finished the exits
    litter.remove_tmpdir(str(tmpdir) if tmpdir else None)
    litter.remove_shm(shm, since)


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error, OSError):
            p.send_signal(sig)


async def _wait_gone(find: Callable[[], list[psutil.Process]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not await asyncio.to_thread(find):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)


async def terminate(
    find: Callable[[], list[psutil.Process]],
    grace: float,
    leader: Child | None = None,
    cg: Path | None = None,
) -> list[int]:
    """SIGTERM, `grace` seconds, then SIGKILL everything `find` returns (and
    `cgroup.kill` on `cg`: the kernel kills what forks meanwhile, too).

    SIGCONT follows SIGTERM so a stopped (SIGSTOP) process can act on it.
    Returns the pids that had to be SIGKILLed. Completes only when none remain.
    """
    procs = await asyncio.to_thread(find)
    if not procs and leader is None:
        return []  # a second look costs a scan of the process table (a restore's)
    _signal(procs, signal.SIGTERM)
    _signal(procs, signal.SIGCONT)
    if leader is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(leader.wait(), grace)
    if await _wait_gone(find, grace if leader is None else 0.5):
        return []
    killed: list[int] = []
    if cg is not None:
        cgroup.kill(cg)
    for _ in range(50):  # children may fork while we kill; go until none is left
        procs = await asyncio.to_thread(find)
        if not procs:
            break
        killed += [p.pid for p in procs]
        _signal(procs, signal.SIGKILL)
        await _wait_gone(find, 0.5)
    if leader is not None:
        await leader.wait()
    return sorted(set(killed))


async def stop(record: Record, grace: float, leader: Child | None = None) -> list[int]:
    """Stop every process of a launch, then remove what it leaves (cgroup,
    TMPDIR, shared memory). Returns the pids that had to be SIGKILLed."""
    cg = Path(record.cgroup) if record.cgroup else None
    first = await asyncio.to_thread(members, record)
    shm = set(record.shm) | await asyncio.to_thread(litter.shm_of, [p.pid for p in first])
    killed = await terminate(lambda: members(record), grace, leader, cg)
    since = record.create_time or None  # None: a cgroup without a record
    await asyncio.to_thread(_clean, cg, record.tmpdir, shm, since)
    return killed


def track(children: list[Child]) -> list[Child]:
    """One snapshot of every server's tree (blocking: run it in a thread): each
    child's record learns the processes and shared memory seen; returns the
    children whose record changed (to be saved)."""
    changed = []
    snaps = tracking.snapshot([c.record for c in children])
    for child, (rec, alive) in zip(children, snaps, strict=True):
        # Segments still on disk: one the tree removed itself is no litter.
        shm = {p for p in rec.shm if os.path.exists(p)} | litter.shm_of(alive)
        if shm != set(rec.shm):
            rec = replace(rec, shm=tuple(sorted(shm)))
        child.pids = alive
        if rec != child.record:
            child.record = rec
            changed.append(child)
    return changed


def save(state_dir: Path, child: Child) -> None:
    save_record(state_dir, child.record)


async def reap_loop(interval: float = 5.0) -> None:
    """Wait for orphans that came back to us (subreaper) once they exit: on
    SIGCHLD, and every `interval` seconds in case signals were merged."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    loop.add_signal_handler(signal.SIGCHLD, wake.set)
    try:
        while True:
            tracking.reap_orphans()
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), interval)
    finally:
        loop.remove_signal_handler(signal.SIGCHLD)


def strays() -> list[psutil.Process]:
    """Orphans of our servers that came back to us and that no record names."""
    out = []
    for pid in tracking.strays():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


# ------------------------------------------------------------------ ports


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> str:
    """Who listens on `port`, for an error message."""
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.Error, OSError):
        conns = []
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            try:
                p = psutil.Process(c.pid)
                cmd = " ".join(p.cmdline())[:120] or p.name()
                return f"pid {c.pid} ({cmd}, user {p.username()})"
            except psutil.Error:
                return f"pid {c.pid}"
    return "another process (not visible to this user)"
