"""The only place that spawns, signals and reaps server processes.

Every server runs in its own session (so its process group is its pid), with
`LLMSUP_INSTANCE=<state key>:<unit>:<random>` in its environment. Children
inherit that variable, so a process that left the group (or was orphaned when
the daemon itself was SIGKILLed) is still found and never confused with a
process that merely reuses a pid: we signal only processes that carry our
marker, or that sit in our group and were created after our launch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
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
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

MARKER = "LLMSUP_INSTANCE"
# Never passed to servers: systemd's notify socket belongs to the daemon alone.
SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def state_key(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Record:
    """What the state directory remembers of one launched process group."""

    unit: str
    instance: str
    pid: int
    pgid: int
    create_time: float
    argv: list[str]


class RotatingLog:
    """A per-server log file, rotated by size (`name.log.1` ... `name.log.N`)."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "ab")  # noqa: SIM115 - kept open for the server's life

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self._f.flush()
        if self.max_bytes and self._f.tell() >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._f.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._f = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        self._f.close()


class Child:
    """A running server: its process, its record, and its output pump.

    The process is started in a worker thread (`spawn`): fork/exec blocks the
    calling thread until the new program runs, and the event loop must go on
    serving status, probes and the gateway meanwhile. Nothing else reaps it:
    `exited` does, through `Popen.poll`.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        record: Record,
        log: RotatingLog,
        on_line: Callable[[str], None],
    ) -> None:
        self.proc = proc
        self.record = record
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
        loop = asyncio.get_running_loop()
        fd = None
        if self.proc.poll() is None:
            with contextlib.suppress(AttributeError, OSError):
                fd = os.pidfd_open(self.proc.pid)
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
        while (code := self.proc.poll()) is None:
            await asyncio.sleep(0.05)
        return code

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
    log: RotatingLog,
    on_line: Callable[[str], None],
) -> Child:
    """Start `argv` in a new session; stdout and stderr go to `log`."""
    instance = f"{key}:{unit}:{uuid.uuid4().hex[:12]}"
    env = {**env, MARKER: instance}
    log.write(f"--- llmsup: starting {unit}: {argv[0]} (instance {instance})\n".encode())

    def popen() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    # A future, not a task: nothing (not even the loop's shutdown) cancels it while
    # the thread forks, so `_kill_unwanted` always learns of the process.
    started = asyncio.get_running_loop().run_in_executor(None, popen)
    try:
        proc = await asyncio.shield(started)
    except asyncio.CancelledError:
        # A stop while the thread forks: the server starts all the same, and nobody
        # would supervise it. Stop it as soon as it exists.
        started.add_done_callback(_kill_unwanted)
        raise
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        created = time.time()
    record = Record(unit, instance, proc.pid, proc.pid, created, list(argv))
    return Child(proc, record, log, on_line)


def _kill_unwanted(started: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    """Kill and reap the server a cancelled `spawn` started all the same."""
    if started.cancelled() or started.exception() is not None:
        return
    proc = started.result()
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)  # its group: the server, and any child it started
    if proc.stdout is not None:
        proc.stdout.close()
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it


# ----------------------------------------------------------------- finding


@dataclass(frozen=True)
class Seen:
    """One live process as a scan of the process table saw it."""

    proc: psutil.Process
    marker: str | None
    pgid: int
    create_time: float


class ProcessTable:
    """Scans of the process table, shared and cheap enough for many servers.

    Every stop looks for the members of one launch until none is left, and a
    `down` runs one stop per server at once: scanning per caller made that
    quadratic in the number of servers. So a caller gets the latest scan that
    began after it asked, and callers that ask while a scan runs share the next
    one. A process's marker is read from its environment once per (pid, start
    time): the initial environment of a process never changes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, list[Seen]] | None = None
        self._markers: dict[tuple[int, float], str | None] = {}
        self.scans = 0  # how many scans ran (for tests and benchmarks)

    def scan(self) -> list[Seen]:
        asked = time.monotonic()
        with self._lock:
            if self._last is not None and self._last[0] >= asked:
                return self._last[1]  # began after we asked: as fresh as our own
            began = time.monotonic()
            seen = self._scan()
            self._last = (began, seen)
            self.scans += 1
            return seen

    def _scan(self) -> list[Seen]:
        me, now = os.getpid(), time.time()
        seen: list[Seen] = []
        markers: dict[tuple[int, float], str | None] = {}
        for p in psutil.process_iter(["create_time", "status"]):
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == me:
                continue
            created = p.info["create_time"]
            key = (p.pid, created)
            mark = self._markers[key] if key in self._markers else _marker(p)
            # A process younger than a second may not have exec'd yet (a fork of
            # ours still holds our environment): read it again next time.
            if mark is not None or now - created > 1.0:
                markers[key] = mark
            try:
                pgid = os.getpgid(p.pid)
            except OSError:
                continue
            seen.append(Seen(p, mark, pgid, created))
        self._markers = markers  # forget the dead
        return seen


TABLE = ProcessTable()


def _marker(p: psutil.Process) -> str | None:
    try:
        return p.environ().get(MARKER)
    except (psutil.Error, OSError):
        return None


def members(record: Record, table: ProcessTable = TABLE) -> list[psutil.Process]:
    """Every live process of this launch: its group, and marked escapees."""
    return [
        s.proc
        for s in table.scan()
        if s.marker == record.instance
        or (
            s.marker is None  # environment unreadable, but in our group and young enough
            and s.pgid == record.pgid
            and s.create_time >= record.create_time - 1.0
        )
    ]


def tree_pids(pid: int) -> set[int]:
    """A process and its descendants (cheap: no environment reads)."""
    try:
        root = psutil.Process(pid)
        return {pid} | {c.pid for c in root.children(recursive=True)}
    except psutil.Error:
        return set()


def marked_with(prefix: str, table: ProcessTable = TABLE) -> list[psutil.Process]:
    """Processes whose marker starts with `prefix` (a state key: all of one daemon's)."""
    return [s.proc for s in table.scan() if s.marker is not None and s.marker.startswith(prefix)]


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
    find: Callable[[], list[psutil.Process]], grace: float, leader: Child | None = None
) -> list[int]:
    """SIGTERM, `grace` seconds, then SIGKILL everything `find` returns.

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


# ---------------------------------------------------------------- records


def record_dir(state_dir: Path) -> Path:
    return state_dir / "procs"


def save_record(state_dir: Path, record: Record) -> None:
    d = record_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{record.instance.replace(':', '_')}.tmp"
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(d / f"{record.instance.replace(':', '_')}.json")


def drop_record(state_dir: Path, record: Record) -> None:
    (record_dir(state_dir) / f"{record.instance.replace(':', '_')}.json").unlink(missing_ok=True)


def load_records(state_dir: Path) -> list[Record]:
    out = []
    for f in sorted(record_dir(state_dir).glob("*.json")):
        try:
            out.append(Record(**json.loads(f.read_text())))
        except (OSError, ValueError, TypeError):
            f.unlink(missing_ok=True)  # a torn write from a killed daemon
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
