"""Starting a server, watching it, and stopping its whole tree.

Every server runs in its own session (so its process group is its pid), with
`LLMSUP_INSTANCE=<state key>:<unit>:<random>` in its environment, a private
TMPDIR, and (where the daemon may make one) a cgroup of its own that it joins
before it runs its first instruction. `tracking` says how its processes are
found again; we signal only those.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import psutil

from llmsup.process import cgroup, litter, tracking
from llmsup.process.logfile import ServerLog
from llmsup.process.records import Record, save_record
from llmsup.process.tracking import MARKER, members

# Never passed to servers: systemd's notify socket belongs to the daemon alone.
SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
TRACK_INTERVAL = 2.0  # seconds between snapshots of the servers' trees
# The server joins its cgroup itself, between fork and exec: a shell writes its own
# pid into cgroup.procs, then execs the server in place (same pid). See `spawn`.
_JOIN = '{ echo $$ > "$1"; } 2>/dev/null; shift; exec "$@"'
_SH = "/bin/sh"


class Child:
    """A running server: its process, its record, and its output pump.

    The pump reads the server's output for as long as the pipe is open, whatever
    becomes of its log (`ServerLog.write` never raises): a server never blocks
    on its output, nor sees EPIPE.

    The process is started in a worker thread (`spawn`): fork/exec blocks the
    calling thread until the new program runs, and the event loop must go on
    serving status, probes and the gateway meanwhile. Nothing else reaps it:
    `exited` does, through `Popen.poll`. `record` grows as `track` sees the
    tree; `pids` are the live members the last snapshot found.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        record: Record,
        log: ServerLog,
        on_line: Callable[[str], None],
    ) -> None:
        self.proc = proc
        self.record = record
        self.pids: set[int] = {proc.pid}
        self.log = log
        self.tail: deque[str] = deque(maxlen=20)
        self._on_line = on_line
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self.proc.stdout
        )
        partial = b""
        try:
            while chunk := await reader.read(65536):
                self.log.write(chunk)
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()[-4096:]
                for raw in lines:
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    self.tail.append(line)
                    self._on_line(line)
        finally:
            transport.close()

    async def exited(self) -> int:
        """The exit status of the server process itself.

        Not its output's end: an orphaned vLLM EngineCore keeps the pipe open
        forever. A pidfd tells us of the exit at once; without pidfds (Linux <
        5.3), poll every 50 ms.
        """
        return await exit_status(self.proc)

    async def wait(self) -> int:
        """Until the process has exited and its output is drained."""
        code = await self.exited()
        await asyncio.shield(self.pump)
        return code

    async def close(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.pump), 2.0)
        if not self.pump.done():
            self.pump.cancel()
            await asyncio.wait({self.pump})  # its pipe closed before we return
        if self.proc.stdout is not None:
            self.proc.stdout.close()  # a no-op unless the pump was cancelled before it began
        self.log.close()


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


async def spawn(
    unit: str,
    argv: list[str],
    env: dict[str, str],
    key: str,
    log: ServerLog,
    on_line: Callable[[str], None],
    *,
    state_dir: Path | None = None,
    cgroups: Path | None = None,
) -> Child:
    """Start `argv` in a new session; stdout and stderr go to `log`.

    With `state_dir`, the server gets a private TMPDIR under it; with `cgroups`
    (from `cgroup.prepare`), a cgroup of its own there. Python's subprocess
    cannot start a child inside a cgroup (no clone3 CLONE_INTO_CGROUP), and
    writing to cgroup.procs in a preexec_fn is unsafe in a threaded daemon; so
    the child is a /bin/sh that moves itself into the cgroup and then execs the
    server in place. Every process the server ever forks is thus inside. The
    daemon writes the pid once more after the fork, in case the shell could not.
    """
    instance = f"{key}:{unit}:{uuid.uuid4().hex[:12]}"
    tmpdir = litter.make_tmpdir(state_dir, instance) if state_dir else None
    cg = cgroup.create(cgroups, unit, instance) if cgroups else None
    env = {**env, MARKER: instance, **(litter.tmp_env(tmpdir) if tmpdir else {})}
    log.write(f"--- llmsup: starting {unit}: {argv[0]} (instance {instance})\n".encode())
    run = argv
    if cg is not None and os.path.exists(_SH):
        run = [_SH, "-c", _JOIN, "llmsup-join", str(cg / "cgroup.procs"), *argv]

    def popen() -> subprocess.Popen[bytes]:
        with tracking.OWN_LOCK:  # orphan reaping must not take this child's exit
            proc = subprocess.Popen(
                run,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            tracking.own(proc)
        if cg is not None:
            with contextlib.suppress(OSError):
                cgroup.join(cg, proc.pid)
        return proc

    # A future, not a task: nothing (not even the loop's shutdown) cancels it while
    # the thread forks, so `_kill_unwanted` always learns of the process.
    started = asyncio.get_running_loop().run_in_executor(None, popen)
    try:
        proc = await asyncio.shield(started)
    except asyncio.CancelledError:
        # A stop while the thread forks: the server starts all the same, and nobody
        # would supervise it. Stop it as soon as it exists.
        started.add_done_callback(lambda f: _kill_unwanted(f, cg, tmpdir))
        raise
    except OSError:
        _clean(cg, tmpdir, set())
        raise
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        created = time.time()
    record = Record(
        unit,
        instance,
        proc.pid,
        proc.pid,
        created,
        list(argv),
        cgroup=str(cg) if cg else None,
        tmpdir=str(tmpdir) if tmpdir else None,
        known=((proc.pid, created),),
    )
    return Child(proc, record, log, on_line)


def _kill_unwanted(
    started: asyncio.Future[subprocess.Popen[bytes]], cg: Path | None, tmpdir: Path | None
) -> None:
    """Kill and reap the server a cancelled `spawn` started all the same."""
    if started.cancelled() or started.exception() is not None:
        _clean(cg, tmpdir, set())
        return
    proc = started.result()
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)  # its group: the server, and any child it started
    if cg is not None:
        cgroup.kill(cg)
    if proc.stdout is not None:
        proc.stdout.close()

    def reap() -> None:
        proc.wait()
        _clean(cg, tmpdir, set())

    threading.Thread(target=reap, daemon=True).start()


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
