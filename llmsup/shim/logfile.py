"""A server's log file: its raw output as it comes, rotated by size, and never a
reason for the server to suffer.

Rotation is the standard library's `RotatingFileHandler` (`NAME.log`, then
`NAME.log.1` ... `NAME.log.N`); the handler is used as a writer only, attached
to no logger. A write that fails (a full disk, a quota, an I/O error) drops the
chunk and counts it: the caller goes on reading the server's pipe, so the
server never blocks nor sees EPIPE. The next chunk tries again, reopening the
file once `RESUME_FREE` bytes are free; once a write succeeds, a line in the
log says how much was dropped. The daemon's log gets one warning per episode
and one line when it ends.

Standard library only: a process of its own may run it one day.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from io import TextIOWrapper
from pathlib import Path

Opener = Callable[[str], TextIOWrapper]  # a path -> a text stream appending to it

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# Dropping ends once this much is free again: a few bytes freed must not end and
# begin an episode at every chunk.
RESUME_FREE = 256 * 1024


class _Handler(logging.handlers.RotatingFileHandler):
    """The standard rotation, writing each record's message as it is and keeping
    (instead of printing) the error a write met."""

    terminator = ""  # the server's output carries its own newlines

    def __init__(self, path: Path, max_bytes: int, backups: int, opener: Opener | None) -> None:
        self._opener = opener
        self.failure: BaseException | None = None
        super().__init__(
            path,
            maxBytes=max_bytes,
            backupCount=max(backups, 1),
            encoding="utf-8",
            errors="replace",
            delay=True,  # opened by the first write: making a log never fails
        )
        if backups == 0:  # no backup kept: the full file is removed and begun anew
            self.rotator = _remove

    def _open(self) -> TextIOWrapper:
        return self._opener(self.baseFilename) if self._opener else super()._open()

    def handleError(self, record: logging.LogRecord) -> None:
        self.failure = sys.exc_info()[1]


def _remove(source: str, _dest: str) -> None:
    os.remove(source)


class ServerLog:
    """One server's log file. `write` never raises.

    `opener` and `free` stand in for the file system in tests: what opens the
    file for appending, and the bytes free for us where it lies (None: unknown).
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        backups: int,
        *,
        logger: logging.Logger | None = None,
        opener: Opener | None = None,
        free: Callable[[Path], int | None] | None = None,
    ) -> None:
        self.path = path
        self.dropped_bytes = 0  # since this log was made (a chunk counts whole)
        self.dropped_chunks = 0
        self._episode = 0  # bytes dropped since the last write that succeeded
        self._error: OSError | None = None  # set while output is being dropped
        self._at_line_start = True
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._log = logger or logging.getLogger("llmsup")
        self._free = free or free_bytes
        with contextlib.suppress(OSError):  # else each write fails, counted: status says so
            path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = _Handler(path, max_bytes, backups, opener)

    @property
    def warning(self) -> str:
        """While output is being dropped, what the daemon's log said of it; else ""."""
        return _warning(self.path, self._error) if self._error else ""

    def write(self, data: bytes) -> None:
        """Append `data` (a multi-byte character cut between two chunks is kept whole)."""
        if text := self._decoder.decode(data):
            self._write(text, len(data))

    def close(self) -> None:
        if tail := self._decoder.decode(b"", final=True):
            self._write(tail, 0)
        self._error = None  # the server is gone: nothing more is dropped
        try:
            self._handler.close()
        except Exception:  # a flush that fails at close: the file is closed all the same
            self._handler.stream = None

    def _write(self, text: str, size: int) -> None:
        if self._error is not None:
            free = self._free(self.path.parent)
            if free is not None and free < RESUME_FREE:
                self._drop(size)
                return
            text = self._resume_line() + text
        error = self._emit(text)
        if error is not None:
            if self._error is None:
                self._error = error
                self._log.warning("%s", _warning(self.path, error))
            self._drop(size)
            self._at_line_start = _ends_line(self.path)  # part of it may have been written
            return
        if self._error is not None:
            self._log.info(
                "%s: writing again; %d bytes of output were dropped", self.path, self._episode
            )
            self._error, self._episode = None, 0
        self._at_line_start = text.endswith("\n")

    def _resume_line(self) -> str:
        lead = "" if self._at_line_start else "\n"
        why = self._error.strerror if self._error else ""
        return (
            f"{lead}--- llmsup: {self._episode} bytes of output dropped "
            f"while this log could not be written ({why})\n"
        )

    def _emit(self, text: str) -> OSError | None:
        """Write `text` through the handler; the error it met, if any."""
        h = self._handler
        h.failure = None
        h.emit(logging.makeLogRecord({"msg": text}))
        if h.failure is None:
            return None
        error, h.failure = h.failure, None
        # Close what failed, dropping what its buffer holds; the next write reopens.
        stream, h.stream = h.stream, None
        if stream is not None:
            with contextlib.suppress(Exception):  # a flush that fails again: the fd closes anyway
                stream.close()
        return error if isinstance(error, OSError) else OSError(errno.EIO, str(error))

    def _drop(self, size: int) -> None:
        self.dropped_bytes += size
        self.dropped_chunks += 1
        self._episode += size


def free_bytes(directory: Path) -> int | None:
    """Bytes we may still write under `directory` (root may use the reserved blocks)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _ends_line(path: Path) -> bool:
    """Whether `path` is empty or ends with a newline (or cannot be read)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except OSError:
        return True


def _warning(path: Path, error: OSError) -> str:
    what = "disk full" if error.errno in _FULL else "cannot write"
    return f"{path}: {what} ({error.strerror or error}): dropping output"
