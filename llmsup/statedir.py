"""The state directory: one daemon's control socket, logs, process records, its
servers' TMPDIRs and the lock that says the daemon runs.

    STATE/control.sock      the control socket (llmsup.api)
    STATE/daemon.lock       held (flock) by the daemon while it runs; holds its pid
    STATE/daemon.log        the output of a daemon started with `llmsup up -d`
    STATE/logs/UNIT.log     each server's stdout and stderr
    STATE/procs/*.json      one record per launch (llmsup.process.records)
    STATE/tmp/ID/           each launch's private TMPDIR (llmsup.process.litter)

Light on imports: the CLI needs it for every command.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmsup.errors import DaemonError
from llmsup.yamlsrc import expand_env

SOCKET_NAME = "control.sock"
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the NUL


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

    def create(self, group: str | None = None) -> None:
        """The directory, 0700; with `group`, 0750 and that group's, so that its
        members reach the control socket inside."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if group is not None:
            import grp

            os.chown(self.path, -1, grp.getgrnam(group).gr_gid)
            os.chmod(self.path, 0o750)

    def acquire(self, group: str | None = None) -> DaemonLock:
        """Create the directory and take the daemon's lock, writing our pid in it;
        DaemonError when another daemon holds it. Held until released or we exit."""
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
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
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
