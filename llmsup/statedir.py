"""The state directory: one daemon's control socket, logs, process records, its
servers' TMPDIRs and the lock that says the daemon runs.

    STATE/format            the format it is written in (see FORMAT)
    STATE/control.sock      the control socket (llmsup.api)
    STATE/daemon.lock       held (flock) by the daemon while it runs; holds its pid
    STATE/daemon.log        the output of a daemon started with `llmsup up -d`
    STATE/logs/UNIT.log     each server's stdout and stderr
    STATE/procs/*.json      one record per launch (llmsup.process.records), and
                            beside it what its log shim writes (*.pid, *.exit, *.status)
    STATE/units/UNIT.json   each server's restart counters and FAILED/STOPPED state,
                            for the next daemon (llmsup.supervise.memory)
    STATE/tmp/ID/           each launch's private TMPDIR (llmsup.process.litter)

The directory outlives the llmsup that wrote it: a newer llmsup reads what an older
one left (and adopts its servers, or stops those it cannot); an older one refuses a
newer format before it signals or writes anything. The format is said twice:

- `STATE/format`, `{"format": 1, "written_by": "llmsup 0.1.0"}`, written (atomically)
  by the daemon once it holds the lock: the directory's format, read before any
  record, and the llmsup that wrote it (the one to upgrade to).
- a `format` field in each record (llmsup.process.records): records outlive the
  daemon that wrote them and a newer daemon writes the format file without rewriting
  them, so each says what it is; and a newer record is told apart from a torn write
  (which is removed), never deleted for a field this llmsup cannot parse.

No format file, or a record without `format` (as llmsup wrote them before formats):
format 0, the same fields as format 1. Format 2: every server runs under a log shim
that its record names, and `units/` remembers each server's life; a record of
format 0 or 1 names no shim (its server's output went to the daemon that is gone):
its server is stopped and started again, never adopted.

Light on imports: the CLI needs it for every command.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmsup import __version__
from llmsup.errors import DaemonError, StateFormatError
from llmsup.yamlsrc import expand_env

SOCKET_NAME = "control.sock"
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the NUL
FORMAT = 2  # of the state directory and its records: the newest this llmsup reads
WRITTEN_BY = f"llmsup {__version__}"


def stamp() -> dict[str, Any]:
    """What a format file or record says of its format, and who wrote it."""
    return {"format": FORMAT, "written_by": WRITTEN_BY}


def format_of(data: Mapping[str, Any], what: str) -> int:
    """The format `data` (the JSON of a format file or record; `what`: the state
    directory or the record's file) is written in: 0 without one; StateFormatError
    for one this llmsup cannot read."""
    fmt = data.get("format", 0)
    if isinstance(fmt, int) and not isinstance(fmt, bool) and 0 <= fmt <= FORMAT:
        return fmt
    by = data.get("written_by")
    by = by if isinstance(by, str) and by else "a newer llmsup"
    raise StateFormatError(
        f"this llmsup ({__version__}) reads state formats up to {FORMAT}; {what} was "
        f"written by {by} (format {fmt!r}): upgrade llmsup, or run `llmsup down` with "
        "the newer one first; nothing was stopped or changed"
    )


@dataclass(frozen=True)
class StateDir:
    path: Path

    @classmethod
    def default(cls) -> StateDir:
        """`$LLMSUP_STATE_DIR`; else /var/lib/llmsup as root, ~/.local/state/llmsup otherwise."""
        if os.environ.get("LLMSUP_STATE_DIR"):
            return cls(Path(os.environ["LLMSUP_STATE_DIR"]))
        if os.geteuid() == 0:
            return cls(Path("/var/lib/llmsup"))
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return cls(Path(base) / "llmsup")

    @classmethod
    def named(cls, state_dir: str | None) -> StateDir:
        """A manifest's (validated) `state_dir`; None: the default."""
        return cls(Path(state_dir)) if state_dir else cls.default()

    @classmethod
    def of_file(cls, manifest: Path) -> StateDir:
        """The manifest's `state_dir`, read without validating the rest (for status, logs...)."""
        try:
            # libyaml when PyYAML has it: a 100-model manifest in 10 ms, not 130
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            data = yaml.load(manifest.read_text(encoding="utf-8"), Loader=loader)
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return cls.default()
        value = data.get("state_dir") if isinstance(data, dict) else None
        if isinstance(value, str) and value:
            return cls(Path(expand_env(value, os.environ)[0]))
        return cls.default()

    def same(self, other: StateDir) -> bool:
        return self.path.resolve() == other.path.resolve()

    @property
    def key(self) -> str:
        """Names this directory in the marker of every process its daemon starts."""
        return hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:10]

    @property
    def socket(self) -> Path:
        """The control socket; DaemonError when its path is too long for a unix socket."""
        path = self.path / SOCKET_NAME
        if len(str(path).encode()) > _UNIX_PATH_MAX:
            raise DaemonError(
                f"control socket path {path} is longer than {_UNIX_PATH_MAX} bytes; "
                "choose a shorter state_dir"
            )
        return path

    @property
    def daemon_log(self) -> Path:
        return self.path / "daemon.log"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def log(self, unit: str) -> Path:
        return self.logs / f"{unit}.log"

    @property
    def records(self) -> Path:
        return self.path / "procs"

    @property
    def tmp(self) -> Path:
        """Where the launches' private TMPDIRs go (the full path: their length matters)."""
        return self.path.resolve() / "tmp"

    @property
    def lock_file(self) -> Path:
        return self.path / "daemon.lock"

    @property
    def format_file(self) -> Path:
        return self.path / "format"

    def read_format(self) -> int:
        """The format the format file says (0 without one); StateFormatError when this
        llmsup cannot read the directory. Reads only."""
        try:
            text = self.format_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as e:
            raise StateFormatError(f"cannot read {self.format_file}: {e}") from None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):  # written atomically: not a torn write
            raise StateFormatError(
                f"{self.format_file} is not a format this llmsup ({__version__}) reads: "
                "if a newer llmsup wrote it, upgrade llmsup or run `llmsup down` with that "
                "one first; nothing was stopped or changed"
            )
        return format_of(data, str(self.path))

    def check_format(self) -> None:
        """StateFormatError when the directory, or a record in it, is of a format this
        llmsup cannot read. Reads only: a record that does not parse is a torn write,
        left for `load_records` to remove."""
        self.read_format()
        for f in sorted(self.records.glob("*.json")):
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                format_of(data, str(f))

    def _write_format(self) -> None:
        tmp = self.path / ".format.tmp"
        tmp.write_text(json.dumps(stamp()) + "\n", encoding="utf-8")
        tmp.replace(self.format_file)

    def create(self, group: str | None = None) -> None:
        """The directory, 0700; with `group`, 0750 and that group's, so that its
        members reach the control socket inside."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if group is not None:
            import grp

            os.chown(self.path, -1, grp.getgrnam(group).gr_gid)
            os.chmod(self.path, 0o750)

    def acquire(self, group: str | None = None) -> DaemonLock:
        """Create the directory and take the daemon's lock, writing our pid in it and
        our format in the format file; DaemonError when another daemon holds it, and
        StateFormatError (before anything is written) when a newer llmsup wrote the
        directory. Held until released or we exit."""
        self.check_format()
        self.create(group)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DaemonError(
                f"another llmsup daemon already runs on {self.path} "
                "(use `llmsup reload` or `llmsup up` to hand it a manifest)"
            ) from None
        try:
            self.check_format()  # again: a newer daemon may have run since
        except StateFormatError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._write_format()  # older records keep theirs: they are read as they are
        return DaemonLock(fd)

    @contextlib.contextmanager
    def vacant(self) -> Iterator[None]:
        """Hold the daemon's lock for a while: no daemon runs here, not even one that
        does not answer, and none starts until we are done. Creates nothing."""
        try:
            fd = os.open(self.lock_file, os.O_RDWR)
        except FileNotFoundError:
            yield  # no daemon ever ran here
            return
        except PermissionError:
            raise DaemonError(
                f"permission denied on {self.lock_file}: run as the daemon's user"
            ) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise DaemonError(
                    f"a daemon (pid {pid}) holds {self.path} but does not answer on "
                    f"{self.socket}: it may be starting, or stuck; retry in a moment, "
                    f"or stop it with `kill {pid}`"
                ) from None
            yield
        finally:
            os.close(fd)


class DaemonLock:
    """The daemon's hold on its state directory (see `StateDir.acquire`)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
