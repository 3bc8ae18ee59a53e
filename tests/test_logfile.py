"""A server's log file (`ServerLog`): raw output, rotation by size, and a full
disk that drops output (counted, said once) instead of hurting the server.
The file system is real (tmp_path) or a `Disk` that runs out of space at will."""

from __future__ import annotations

import errno
import io
import logging
import os
from pathlib import Path

import pytest

from llmsup.process import ServerLog
from llmsup.shim.logfile import RESUME_FREE


class Disk:
    """A file system with `free` bytes left: a write that does not fit fails with
    ENOSPC, whole or (`partial`) once what fits is written; `open_error`, when set,
    is what opening a file raises."""

    def __init__(self, free: int, partial: bool = False) -> None:
        self.free = free
        self.partial = partial
        self.opens = 0
        self.open_error: OSError | None = None

    def open(self, path: str) -> io.TextIOWrapper:
        self.opens += 1
        if self.open_error is not None:
            raise self.open_error
        return _File(self, path)

    def space(self, _directory: Path) -> int:
        return self.free


class _File(io.TextIOWrapper):
    def __init__(self, disk: Disk, path: str) -> None:
        super().__init__(open(path, "ab"), encoding="utf-8")  # noqa: SIM115 - closed by the log
        self.disk = disk

    def write(self, s: str) -> int:
        n = len(s.encode())
        if n > self.disk.free:
            if self.disk.partial:  # ASCII in these tests: a byte a character
                super().write(s[: self.disk.free])
                self.disk.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.free -= n
        return super().write(s)


@pytest.fixture
def logger(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.INFO, logger="test.logfile")
    return logging.getLogger("test.logfile")


def on(disk: Disk, path: Path, logger: logging.Logger, max_bytes: int = 1 << 20) -> ServerLog:
    return ServerLog(path, max_bytes, 1, logger=logger, opener=disk.open, free=disk.space)


def said(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records]


def test_output_is_written_as_it_comes(tmp_path: Path) -> None:
    log = ServerLog(tmp_path / "logs" / "m.log", 1 << 20, 1)
    euro = "€".encode()
    for chunk in (b"Loading 10%\r", b"Loading 20%\r", b"done\nbad \xff byte, ", euro[:1], euro[1:]):
        log.write(chunk)  # a character cut between two chunks is kept whole
    log.write(b"no newline at the end")
    log.close()
    assert (tmp_path / "logs" / "m.log").read_bytes() == (
        b"Loading 10%\rLoading 20%\rdone\nbad \xef\xbf\xbd byte, \xe2\x82\xacno newline at the end"
    )
    assert (log.dropped_bytes, log.warning) == (0, "")


def test_log_rotates_by_size_and_keeps_n_backups(tmp_path: Path) -> None:
    log = ServerLog(tmp_path / "m.log", max_bytes=100, backups=2)
    for i in range(10):
        log.write(f"line {i:02d} ".encode() * 5 + b"\n")  # 46 bytes
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["m.log", "m.log.1", "m.log.2"]
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())
    assert b"line 09" in (tmp_path / "m.log").read_bytes()
    assert b"line 07" in (tmp_path / "m.log.1").read_bytes()


def test_without_backups_a_full_log_begins_anew(tmp_path: Path) -> None:
    log = ServerLog(tmp_path / "m.log", max_bytes=100, backups=0)
    for i in range(10):
        log.write(f"line {i:02d} ".encode() * 5 + b"\n")
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["m.log"]
    assert (tmp_path / "m.log").read_bytes().startswith(b"line 08")


def test_a_full_disk_drops_output_says_so_once_and_resumes(
    tmp_path: Path, logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    disk = Disk(free=RESUME_FREE)
    path = tmp_path / "m.log"
    log = on(disk, path, logger)
    log.write(b"before\n")
    disk.free = 3
    for _ in range(5):
        log.write(b"x" * 1000)  # never raises
    warning = f"{path}: disk full (No space left on device): dropping output"
    assert (log.dropped_bytes, log.dropped_chunks, log.warning) == (5000, 5, warning)
    assert said(caplog) == [(logging.WARNING, warning)]

    disk.free = RESUME_FREE  # a file deleted: space again
    log.write(b"after\n")
    log.write(b"more\n")
    log.close()
    assert path.read_text() == (
        "before\n"
        "--- llmsup: 5000 bytes of output dropped while this log could not be written "
        "(No space left on device)\n"
        "after\nmore\n"
    )
    assert (log.dropped_bytes, log.warning) == (5000, "")  # the count stays, for status
    assert said(caplog)[1:] == [
        (logging.INFO, f"{path}: writing again; 5000 bytes of output were dropped")
    ]


def test_writing_resumes_only_once_there_is_room(
    tmp_path: Path, logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    disk = Disk(free=RESUME_FREE)
    log = on(disk, tmp_path / "m.log", logger)
    log.write(b"half a line, ")
    disk.free = 0
    log.write(b"dropped\n")
    disk.free = RESUME_FREE - 1  # a few bytes freed: not worth a try
    opens = disk.opens
    log.write(b"dropped too\n")
    assert disk.opens == opens and log.dropped_chunks == 2
    disk.free = RESUME_FREE
    log.write(b"back\n")
    log.close()
    # The note of what was dropped begins a line of its own.
    assert (tmp_path / "m.log").read_text().splitlines() == [
        "half a line, ",
        "--- llmsup: 20 bytes of output dropped while this log could not be written "
        "(No space left on device)",
        "back",
    ]
    assert [level for level, _ in said(caplog)] == [logging.WARNING, logging.INFO]


def test_after_a_write_cut_short_the_note_begins_a_line(
    tmp_path: Path, logger: logging.Logger
) -> None:
    disk = Disk(free=RESUME_FREE, partial=True)
    log = on(disk, tmp_path / "m.log", logger)
    log.write(b"before\n")
    disk.free = 5
    log.write(b"0123456789\n")
    disk.free = RESUME_FREE
    log.write(b"after\n")
    log.close()
    assert (tmp_path / "m.log").read_text().splitlines() == [
        "before",
        "01234",
        "--- llmsup: 11 bytes of output dropped while this log could not be written "
        "(No space left on device)",
        "after",
    ]


def test_a_log_that_cannot_be_opened_drops_output(
    tmp_path: Path, logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    disk = Disk(free=RESUME_FREE)
    disk.open_error = OSError(errno.EIO, os.strerror(errno.EIO))
    log = on(disk, tmp_path / "m.log", logger)
    log.write(b"lost\n")
    log.write(b"lost too\n")
    why = "cannot write (Input/output error)"
    assert log.warning == f"{tmp_path / 'm.log'}: {why}: dropping output"
    assert (log.dropped_bytes, len(said(caplog))) == (14, 1)
    disk.open_error = None
    log.write(b"kept\n")
    log.close()
    assert (tmp_path / "m.log").read_text().endswith("(Input/output error)\nkept\n")


def test_closing_while_the_disk_is_full(tmp_path: Path, logger: logging.Logger) -> None:
    disk = Disk(free=RESUME_FREE)
    log = on(disk, tmp_path / "m.log", logger)
    log.write(b"a")
    disk.free = 0
    log.write(b"b" * 100)
    log.close()  # does not raise; nothing more is being dropped
    assert (log.warning, log.dropped_bytes) == ("", 100)
