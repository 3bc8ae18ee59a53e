"""Running daemons, registered per user in the runtime directory.

A daemon writes one small JSON file there once its control socket answers
(manifest, state dir, socket, pid) and removes it when it exits. The CLI reads
them to find the daemon when no manifest is named: `llmsup up -f x.yaml`
then plain `llmsup status` finds x.yaml's daemon.

Where: `$LLMSUP_RUNTIME_DIR`; as root /run/llmsup; else `$XDG_RUNTIME_DIR/llmsup`
(or /run/user/UID/llmsup); else /tmp/llmsup-UID, which must be ours and
private. An entry whose pid is dead (a daemon that was SIGKILLed) is stale.

Light on imports: the CLI reads it for every command that talks to a daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmsup.errors import UnsafeRuntimeDir as UnsafeRuntimeDir
from llmsup.statedir import StateDir


@dataclass(frozen=True)
class Entry:
    pid: int
    started: int | None  # the pid's start time (clock ticks since boot): pids get reused
    manifest: str
    state_dir: str
    socket: str
    file: Path | None = field(default=None, compare=False)  # where it was read from

    @property
    def state(self) -> StateDir:
        return StateDir(Path(self.state_dir))

    @property
    def alive(self) -> bool:
        return _start_time(self.pid) == self.started if self.started else _exists(self.pid)


def runtime_dir() -> Path:
    """Where this process registers a daemon: the first of `_places()` that exists."""
    return _places()[0]


def _places() -> list[Path]:
    """Every place a daemon of this user may have registered, best first. A
    system service run as a user has no $XDG_RUNTIME_DIR (and, before the user
    logs in, no /run/user/UID), so the CLI of a login shell looks at each."""
    if os.environ.get("LLMSUP_RUNTIME_DIR"):
        return [Path(os.environ["LLMSUP_RUNTIME_DIR"])]
    uid = os.geteuid()
    if uid == 0:
        return [Path("/run/llmsup")]
    places = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        places.append(Path(xdg) / "llmsup")
    user_run = Path(f"/run/user/{uid}")
    if user_run.is_dir() and user_run.stat().st_uid == uid:
        places.append(user_run / "llmsup")
    places.append(Path(f"/tmp/llmsup-{uid}"))
    return list(dict.fromkeys(places))


def _private_dir(path: Path, create: bool) -> Path | None:
    """`path`, a directory of ours that no one else may write to; None if absent."""
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(parents=True, mode=0o700)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UnsafeRuntimeDir(
            f"{path} is not a directory owned by this user and writable only by it; "
            "remove it, or set LLMSUP_RUNTIME_DIR to a private directory"
        )
    return path


def _entry_path(folder: Path, state: StateDir) -> Path:
    key = hashlib.sha256(str(state.path.resolve()).encode()).hexdigest()[:16]
    return folder / f"{key}.json"


def register(manifest: Path, state: StateDir) -> Path:
    """Say that this process is the daemon of `state` (again, after a reload)."""
    folder = _private_dir(runtime_dir(), create=True)
    assert folder is not None
    pid = os.getpid()
    entry = Entry(pid, _start_time(pid), str(manifest), str(state.path), str(state.socket))
    target = _entry_path(folder, state)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({k: v for k, v in asdict(entry).items() if k != "file"}))
    tmp.replace(target)
    return target


def unregister(state: StateDir) -> None:
    with contextlib.suppress(OSError, UnsafeRuntimeDir):
        folder = _private_dir(runtime_dir(), create=False)
        if folder is not None:
            target = _entry_path(folder, state)
            entry = _read(target)
            if entry is None or entry.pid == os.getpid():
                target.unlink(missing_ok=True)


def entries() -> tuple[list[Entry], list[Entry]]:
    """(running, stale) daemons of this user; a directory that is not safe is skipped."""
    live: list[Entry] = []
    dead: list[Entry] = []
    for place in _places():
        try:
            folder = _private_dir(place, create=False)
        except UnsafeRuntimeDir:
            continue
        for f in sorted(folder.glob("*.json")) if folder else []:
            entry = _read(f)
            if entry is None:
                f.unlink(missing_ok=True)
            else:
                (live if entry.alive else dead).append(entry)
    return live, dead


def forget(entry: Entry) -> None:
    """Remove a stale entry (its daemon is gone), unless a new daemon replaced it."""
    if entry.file is not None and _read(entry.file) == entry:
        with contextlib.suppress(OSError):
            entry.file.unlink()


def _read(f: Path) -> Entry | None:
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        return Entry(**data, file=f)
    except (OSError, ValueError, TypeError):
        return None  # gone, torn or foreign: not an entry


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, after the command name (which may hold spaces)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    state, start = fields[0], fields[19]
    return None if state == "Z" else int(start)
