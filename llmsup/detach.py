"""Starting a daemon in the background (`llmsup up -d`): the daemon runs as
`llmsup up --foreground` in a session of its own, its output appended to
STATE_DIR/daemon.log; `start` returns once it answers on its socket with its
launches under way, or says how it ended (with this start's log lines)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmsup.client import alive, call
from llmsup.errors import DaemonError, LlmsupError

if TYPE_CHECKING:
    from llmsup.statedir import StateDir

TAIL_LINES = 40  # of this start's log, shown when the daemon exits before answering


@dataclass(frozen=True)
class Started:
    pid: int


@dataclass(frozen=True)
class Exited:
    """The daemon ended before it answered: its exit code, log, and this start's lines."""

    code: int
    log: Path
    tail: list[str]


def argv(manifest: Path, untrusted: bool) -> list[str]:
    """The daemon's command line: this interpreter's llmsup, in the foreground."""
    return [
        *[sys.executable, "-m", "llmsup.cli", "up", "--foreground", "--quiet"],
        *(["--untrusted"] if untrusted else []),
        *["-f", str(manifest)],
    ]


def start(
    manifest: Path, state: StateDir, untrusted: bool, timeout: float = 60.0
) -> Started | Exited:
    """Start the daemon for `manifest` detached from this process and wait until it
    answers on its socket; raises DaemonError when it neither answers nor exits in time."""
    sock = state.socket
    state.create()
    log = state.daemon_log
    with open(log, "ab") as out:
        offset = out.tell()  # the log is appended to: this start's lines begin here
        proc = subprocess.Popen(
            argv(manifest, untrusted),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive(sock) and _launch_under_way(sock):
            return Started(proc.pid)
        if proc.poll() is not None:
            return Exited(proc.returncode, log, _tail(log, offset))
        time.sleep(0.05)
    lines = "".join(f"\n  {line}" for line in _tail(log, offset)[-10:])
    raise DaemonError(
        f"the daemon (pid {proc.pid}) did not answer within {timeout:g}s; it may still be "
        f"starting: see `llmsup status` and its log {log}"
        + (f"; its last lines:{lines}" if lines else "")
    )


def _tail(log: Path, offset: int) -> list[str]:
    """This start's lines of the log (it is appended to: they begin at `offset`)."""
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()[-TAIL_LINES:]


def _launch_under_way(sock: Path) -> bool:
    """The daemon got a server going (or has none to start now); False while its
    launches are pending and when none could be launched (it then exits, saying why)."""
    try:
        code, data = call(sock, "GET", "/v1/status")
    except LlmsupError:
        return False
    return code < 400 and isinstance(data, dict) and data.get("launch", "under way") == "under way"
