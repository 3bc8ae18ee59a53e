"""A server's log writer that outlives the daemon: one small process per server.

    python -m llmsup.shim --log PATH [options] -- ARGV...

The contract:

- The shim starts ARGV as its child in a new session, with the shim's own
  environment, working directory and stdin; the child's stdout and stderr go to
  one pipe the shim owns. With `--cgroup DIR` the child writes its pid into
  DIR/cgroup.procs between fork and exec (the shim is single-threaded, so a
  preexec_fn is safe here), so that everything it ever runs is inside. If it
  cannot join, it runs all the same and a line in the log says why.
- Every byte of the child's output goes to the log (`--log`, rotated at
  `--max-bytes`, `--backups` kept) through `ServerLog`: on a full disk output
  is dropped and counted, never the pipe, and writing resumes with a line that
  says how much was lost. The log is text: invalid UTF-8 is written as U+FFFD.
- The output is also copied, byte for byte, to the shim's stdout, for whoever
  reads it (the daemon that started the shim). A reader that falls behind gets
  up to `COPY_BACKLOG` bytes buffered, then a gap and a line that says how much
  it missed (the log has it all); a reader that is gone (EPIPE: the daemon
  died) ends the copy for good. Either way the child never sees an error and
  never waits for the reader.
- SIGPIPE, SIGINT, SIGHUP and SIGTERM do not stop the shim: a terminal's or a
  dying daemon's signals are not for it, and the daemon stops the server, not
  the shim. The child gets the default actions for them (or SIG_IGN where the
  shim itself was started with the signal ignored, as `nohup` does).
- `--set-env NAME=VALUE` (repeated): set in the child's environment only (the
  daemon's marker: the shim itself must not look like a process of the server).
- `--pid-file PATH`: as soon as the child runs, before any of its output is
  read, JSON {"format", "pid", "create_time", "shim", "shim_create_time"}: the
  child's pid, its start time in seconds since the epoch as psutil's
  `create_time()` gives it, the shim's pid and start time.
- `--status-file PATH`: JSON {"format", "dropped_bytes", "warning"}, written
  when either changes: how much output the log has dropped (a full disk) and,
  while it drops, why; for `llmsup status`, whichever daemon asks.
- `--exit-file PATH`: as soon as the child has exited, JSON {"format", "pid",
  "code" or "signal", "at"}, so that a daemon that is not the shim's parent learns how the
  server ended. When ARGV could not be started, {"pid": null, "code": 127 (not
  found) or 126, "at", "error"}. Both files are written atomically (a temporary
  file renamed over the path).
- Once the child has exited, the shim reads the pipe until EOF or for at most
  `--linger` seconds (an orphaned grandchild, such as vLLM's EngineCore, may hold
  the pipe open), then exits as its child did: the same exit code, or death by
  the same signal (raised on itself with its default action, core dumps off).

Standard library and `llmsup.shim.logfile` only: it must start fast, stay
small, and keep running whatever becomes of the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import resource
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

from llmsup.shim.logfile import ServerLog

CHUNK = 65536  # bytes read from the child's pipe at a time
COPY_BACKLOG = 2**20  # bytes kept for a reader that falls behind
DEFAULT_LINGER = 5.0
DEFAULT_MAX_BYTES = 50 * 2**20  # the manifest's default `log.max_size`
DEFAULT_BACKUPS = 3
NOT_FOUND, CANNOT_RUN = 127, 126  # as shells report a command they could not run
# Not the shim's to act on; SIGPIPE is ignored by Python itself (a failed write
# says EPIPE), and subprocess gives it back its default action in the child.
_HELD = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)
_POLL_EXIT = 0.05  # seconds between exit checks where there is no pidfd (Linux < 5.3)


FORMAT = 1  # of the pid, exit and status files; a reader refuses a newer one


@dataclass(frozen=True)
class Options:
    argv: tuple[str, ...]
    log: Path
    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS
    exit_file: Path | None = None
    pid_file: Path | None = None
    cgroup: Path | None = None
    linger: float = DEFAULT_LINGER
    env: tuple[tuple[str, str], ...] = ()  # set in the child's environment only
    status_file: Path | None = None


def parse(args: list[str]) -> Options:
    """The options, from the command line (exits 2 with a usage line if wrong)."""
    parser = argparse.ArgumentParser(
        prog="python -m llmsup.shim",
        usage="%(prog)s --log PATH [options] -- ARGV...",
        description="Run ARGV, writing its output to a log that outlives the daemon.",
    )
    parser.add_argument("--log", type=Path, required=True, help="the server's log file")
    parser.add_argument("--max-bytes", type=nonnegative_int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--backups", type=nonnegative_int, default=DEFAULT_BACKUPS)
    parser.add_argument("--exit-file", type=Path, help="where the child's exit status goes")
    parser.add_argument("--pid-file", type=Path, help="where the child's pid goes")
    parser.add_argument("--cgroup", type=Path, help="a cgroup v2 directory the child joins")
    parser.add_argument("--linger", type=nonnegative_seconds, default=DEFAULT_LINGER)
    parser.add_argument(
        "--set-env", type=assignment, action="append", default=[], metavar="NAME=VALUE"
    )
    parser.add_argument("--status-file", type=Path, help="where the log's drops are told")
    if "--" not in args:
        parser.error("the command to run follows `--`: ... -- ARGV...")
    split = args.index("--")
    command = args[split + 1 :]
    if not command:
        parser.error("no command after `--`")
    ns = parser.parse_args(args[:split])
    return Options(
        tuple(command),
        ns.log,
        ns.max_bytes,
        ns.backups,
        ns.exit_file,
        ns.pid_file,
        ns.cgroup,
        ns.linger,
        tuple(ns.set_env),
        ns.status_file,
    )


def assignment(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name:
        raise ValueError(text)
    return name, value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def nonnegative_seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise ValueError(text)
    return value


def exit_record(pid: int | None, returncode: int, at: float) -> dict[str, object]:
    """The exit file's content; `returncode` as subprocess gives it (-N: signal N)."""
    how = {"signal": -returncode} if returncode < 0 else {"code": returncode}
    return {"format": FORMAT, "pid": pid, **how, "at": at}


def create_time(proc_stat: str, boot_time: float, ticks_per_second: int) -> float:
    """A process's start time in seconds since the epoch, from /proc/PID/stat's
    text, computed as psutil computes `create_time()` (so that the two compare
    equal)."""
    fields = proc_stat[proc_stat.rindex(")") + 2 :].split()
    return float(fields[19]) / ticks_per_second + boot_time  # field 22: starttime


def _boot_time() -> float:
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise OSError(errno.ENOENT, "no btime in /proc/stat")


class Copy:
    """The output, copied to `fd` (the shim's stdout) while someone reads it.

    A pipe is written without blocking: what does not fit waits in a backlog of
    up to `backlog` bytes, written as the reader makes room (`flush`, when `fd`
    polls writable); a chunk that would overflow it is left out, and a line
    says so once the backlog has drained. Any other error (EPIPE: the reader is
    gone) ends the copy. A stdout that is not a pipe (a file, a terminal) is
    written as it is: it is not a daemon that may fall behind."""

    def __init__(self, fd: int, backlog: int = COPY_BACKLOG) -> None:
        self.fd = fd
        self.backlog = backlog
        self.open = True
        self.missed = 0  # bytes left out since the backlog last drained
        self._pending = bytearray()
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.set_blocking(fd, False)
        except OSError:  # no stdout at all
            self.open = False

    @property
    def waiting(self) -> bool:
        """Whether bytes wait for the reader to make room."""
        return self.open and bool(self._pending)

    def write(self, data: bytes) -> None:
        if not self.open:
            return
        if self.missed or (self._pending and len(self._pending) + len(data) > self.backlog):
            self.missed += len(data)  # until the backlog drains: the gap is told where it is
            return
        self._pending += data
        self.flush()

    def flush(self) -> None:
        while self.open and self._pending:
            try:
                n = os.write(self.fd, self._pending)
            except BlockingIOError:
                return
            except OSError:  # EPIPE: nobody reads any more
                self.open = False
                self._pending.clear()
                return
            del self._pending[:n]
            if not self._pending and self.missed:
                self._pending += _missed_line(self.missed)
                self.missed = 0


def _missed_line(size: int) -> bytes:
    return f"\n--- llmsup: {size} bytes of output not copied here (the log has them)\n".encode()


def _note(log: ServerLog, text: str) -> None:
    """A line of the shim's own, in the log and on stderr."""
    log.write(f"--- llmsup: {text}\n".encode())
    with contextlib.suppress(OSError):
        os.write(2, f"llmsup shim: {text}\n".encode())


def write_atomic(path: Path, record: Mapping[str, object]) -> None:
    """`record` as JSON at `path`: a temporary file, renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _save(log: ServerLog, path: Path | None, record: Mapping[str, object]) -> None:
    if path is not None:
        try:
            write_atomic(path, record)
        except OSError as e:
            _note(log, f"cannot write {path}: {e.strerror or e}")


class StatusFile:
    """The `--status-file`: its blocks taken at the start (a fixed size), then
    rewritten in place, so that telling of a full disk needs no free block."""

    SIZE = 4096

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: Path, log: ServerLog) -> StatusFile | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            _note(log, f"cannot write {path}: {e.strerror or e}")
            return None
        status = cls(fd)
        if not status.write(0, ""):
            _note(log, f"cannot write {path}: no room for it")
        return status

    def write(self, dropped: int, warning: str) -> bool:
        data = json.dumps({"format": FORMAT, "dropped_bytes": dropped, "warning": warning})
        raw = data.encode()[: self.SIZE - 1] + b"\n"
        try:
            return os.pwrite(self.fd, raw.ljust(self.SIZE, b" "), 0) == self.SIZE
        except OSError:
            return False


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    """Held signals land here: a handler, not SIG_IGN, so the child (exec resets
    handlers, not SIG_IGN) keeps their default actions."""


def hold_signals() -> None:
    for sig in _HELD:
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, _ignore)


def _start(options: Options, log: ServerLog) -> subprocess.Popen[bytes]:
    """Start the child, in its cgroup if it can join it (raises OSError if it
    cannot be started at all)."""
    procs = None
    env = {**os.environ, **dict(options.env)}
    if options.cgroup is not None:
        try:  # opened here, where an error can be told; written in the child
            procs = os.open(options.cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            _note(log, f"cannot join the cgroup {options.cgroup} ({e.strerror}): runs outside it")
    try:
        if procs is not None:
            try:
                return _popen(options.argv, env, lambda: _join(procs))
            except subprocess.SubprocessError:  # the write in the child failed
                _note(log, f"cannot join the cgroup {options.cgroup}: runs outside it")
        return _popen(options.argv, env, None)
    finally:
        if procs is not None:
            os.close(procs)


def _join(procs: int) -> None:
    """In the child, before exec: move itself into the cgroup."""
    os.write(procs, str(os.getpid()).encode())


def _popen(
    argv: tuple[str, ...], env: dict[str, str], preexec: Callable[[], None] | None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=preexec,
    )


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def pump(
    child: subprocess.Popen[bytes],
    log: ServerLog,
    copy: Copy,
    linger: float,
    on_exit: Callable[[int], None],
    on_write: Callable[[], None] = lambda: None,
) -> int:
    """Carry the child's output to `log` and `copy` until it has exited and its
    pipe is drained (EOF, or `linger` seconds after the exit); its return code.

    `on_exit(returncode)` is called as soon as the child has exited."""
    assert child.stdout is not None
    out = child.stdout.fileno()
    pidfd = _pidfd(child.pid)
    poller = select.poll()
    poller.register(out, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    reading, copying = True, False
    returncode: int | None = None
    deadline = math.inf
    while returncode is None or ((reading or copy.waiting) and time.monotonic() < deadline):
        if returncode is None:
            timeout = None if pidfd is not None else _POLL_EXIT * 1000
        else:
            timeout = max(0.0, deadline - time.monotonic()) * 1000
        events = dict(poller.poll(timeout))
        if out in events:
            chunk = os.read(out, CHUNK)
            if chunk:
                log.write(chunk)
                on_write()
                copy.write(chunk)
            else:
                poller.unregister(out)
                reading = False
        if copy.fd in events:
            copy.flush()
        if returncode is None and (pidfd is None or pidfd in events):
            returncode = child.poll()
            if returncode is not None:
                if pidfd is not None:
                    poller.unregister(pidfd)
                    os.close(pidfd)
                deadline = time.monotonic() + linger
                on_exit(returncode)
        if copy.waiting != copying:
            copying = copy.waiting
            if copying:
                poller.register(copy.fd, select.POLLOUT)
            else:
                poller.unregister(copy.fd)
    child.stdout.close()
    assert returncode is not None
    return returncode


def run(options: Options, log: ServerLog, copy: Copy) -> int:
    """Start the child and carry its output until the end; its return code
    (as subprocess gives it: -N for a death by signal N)."""
    try:
        child = _start(options, log)
    except OSError as e:
        code = NOT_FOUND if e.errno == errno.ENOENT else CANNOT_RUN
        _note(log, f"cannot run {options.argv[0]}: {e.strerror or e}")
        record = {**exit_record(None, code, time.time()), "error": str(e.strerror or e)}
        _save(log, options.exit_file, record)
        return code
    if options.pid_file is not None:
        started = {
            "format": FORMAT,
            "pid": child.pid,
            "create_time": _started(child.pid),
            "shim": os.getpid(),
            "shim_create_time": _started(os.getpid()),
        }
        _save(log, options.pid_file, started)

    def exited(returncode: int) -> None:
        _save(log, options.exit_file, exit_record(child.pid, returncode, time.time()))

    status = StatusFile.open(options.status_file, log) if options.status_file else None
    told = (0, "")

    def tell() -> None:  # only when the drops change: a full disk, or writing again
        nonlocal told
        now = (log.dropped_bytes, log.warning)
        if now != told and status is not None and status.write(*now):
            told = now

    return pump(child, log, copy, options.linger, exited, tell)


def _started(pid: int) -> float:
    """`pid`'s start time (seconds since the epoch), as psutil says it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return create_time(f.read(), _boot_time(), os.sysconf("SC_CLK_TCK"))
    except OSError:  # no /proc: the time the shim learned of it
        return time.time()


def mirror(returncode: int) -> NoReturn:
    """Exit as the child did: its exit code, or its death by a signal."""
    if returncode >= 0:
        sys.exit(returncode)
    sig = -returncode
    with contextlib.suppress(OSError, ValueError):  # the server's core is not ours to dump
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    with contextlib.suppress(OSError, ValueError):  # SIGKILL, SIGSTOP: already default
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal whose default is not to end a process


def main(args: list[str] | None = None) -> NoReturn:
    hold_signals()  # first: a daemon may die while the shim is still starting
    options = parse(sys.argv[1:] if args is None else args)
    logging.raiseExceptions = False  # a stderr nobody reads is no reason to print tracebacks
    logger = logging.getLogger("llmsup.shim")
    logger.propagate = False
    logger.setLevel(logging.INFO)  # the end of a full disk is told too
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("llmsup shim: %(message)s"))
    logger.addHandler(handler)
    log = ServerLog(options.log, options.max_bytes, options.backups, logger=logger)
    returncode = run(options, log, Copy(1))
    log.close()
    mirror(returncode)


if __name__ == "__main__":
    main()
