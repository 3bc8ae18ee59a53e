"""A server that runs (`Child`): started by `llmsup.process.spawn`, or adopted from a
daemon before us (`Child.adopt`, once `verify` says it is provably the process that
daemon started).

The server is the child of its log shim (`llmsup.shim`), not ours: its exit is seen
through a pidfd held for its whole life, and its status read from the exit file the
shim writes beside its record (`ShimFiles`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from llmsup.process import cgroup
from llmsup.process.records import SHIM_SUFFIXES, Record
from llmsup.process.tracking import MARKER, SAME_START
from llmsup.state import EXIT_UNKNOWN
from llmsup.statedir import StateDir

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


async def readable(fd: int) -> None:
    """Return once `fd` (a pidfd: its process exited) polls readable."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _until_gone(pid: int, created: float, fd: int | None) -> None:
    """Return once the process `pid` that started at `created` has exited: its pidfd
    `fd` tells us at once; without one, poll every 50 ms."""
    if fd is not None:
        await readable(fd)
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
