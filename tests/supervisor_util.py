"""Run a real llmsup daemon against the fake servers, and look at its processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from llmsup.client import call
from llmsup.process import MARKER, cgroup, state_key
from tests.util import FAKES_DIR, wait_for

LLMSUP = [sys.executable, "-m", "llmsup.cli"]

# Quick timings so that faults are seen and repaired in about a second.
FAST_DEFAULTS = """\
defaults:
  health: {interval: 300ms, timeout: 500ms, failures: 2, startup_timeout: 20s}
  restart: {backoff_initial: 100ms, backoff_max: 1s, max_restarts: 3, window: 1m}
  stop_timeout: 2s
"""


class Daemon:
    """`llmsup up --foreground` in a subprocess, with its manifest and state dir."""

    def __init__(self, tmp: Path, models: str, extra_env: dict[str, str] | None = None) -> None:
        self.dir = tmp
        self.state = tmp / "state"
        self.manifest = tmp / "models.yaml"
        self.write(models)
        self.env = {
            **os.environ,
            "PATH": f"{FAKES_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
            "OLLAMA_MODELS": str(tmp / "ollama-models"),
            "FAKE_LOAD_TIME": "0.3",  # unless a model's env says otherwise
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = tmp / "daemon.out"
        self.preexec: Callable[[], None] | None = None  # run in the daemon before exec
        self.lineage = Lineage(state_key(self.state))
        self.leftovers: list[dict[str, Any]] = []  # what `stop` found left and killed
        self.leaked = False

    def write(self, models: str) -> None:
        body = textwrap.indent(textwrap.dedent(models), "  ")
        self.manifest.write_text(f"state_dir: {self.state}\n{FAST_DEFAULTS}models:\n{body}")

    @property
    def sock(self) -> Path:
        return self.state / "control.sock"

    def start(self) -> None:
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [*LLMSUP, "up", "--foreground", "-f", str(self.manifest)],
                env=self.env,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=self.preexec,
            )
        self.lineage.anchor(self.proc.pid)
        proc = self.proc
        wait_for(lambda: self.answers() or proc.poll() is not None, 30)
        if not self.answers():
            raise AssertionError(f"daemon exited with {proc.poll()}: {self.log()}")

    def answers(self) -> bool:
        try:
            call(self.sock, "GET", "/v1/status", timeout=2)
        except Exception:
            return False
        return True

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def cli(
        self, *args: str, timeout: float = 60, runner: Sequence[str] = LLMSUP
    ) -> subprocess.CompletedProcess[str]:
        """Run the CLI (`runner`: another llmsup's); what it launches (`up -d`'s daemon)
        is remembered as ours."""
        argv = [*runner, *args]
        with subprocess.Popen(
            argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            self.lineage.anchor(proc.pid)
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def status(self) -> dict[str, dict[str, Any]]:
        _, data = call(self.sock, "GET", "/v1/status", timeout=10)
        return {row["name"]: row for row in data["models"]}

    def state_of(self, name: str) -> str:
        return str(self.status()[name]["state"])

    def wait_state(self, name: str, state: str, timeout: float = 20) -> dict[str, Any]:
        last: dict[str, Any] | None = None

        def reached() -> dict[str, Any] | None:
            nonlocal last
            last = self.status().get(name)  # none until the daemon has made its servers
            return last if last is not None and last["state"] == state else None

        try:
            return wait_for(reached, timeout)
        except AssertionError:
            raise AssertionError(f"{name} never {state}: {last}\n{self.diagnosis()}") from None

    def wait_all_ready(self, timeout: float = 30) -> dict[str, dict[str, Any]]:
        def ready() -> dict[str, dict[str, Any]] | None:
            rows = self.status()
            return rows if all(r["state"] == "READY" for r in rows.values()) else None

        try:
            return wait_for(ready, timeout)
        except AssertionError:
            raise AssertionError(f"not all READY:\n{self.diagnosis()}") from None

    def diagnosis(self) -> str:
        """What a wait that timed out needs said, as it is now: each model's state and
        the tail of its server log, the records' files, the daemon's log."""
        out = []
        with contextlib.suppress(Exception):
            for name, row in self.status().items():
                out.append(f"{name}: {row['state']} {row['detail']!r} pid {row['pid']}")
        logs = self.state / "logs"
        for log in sorted(logs.glob("*.log")) if logs.exists() else []:
            tail = log.read_text(errors="replace").splitlines()[-8:]
            out.append(f"--- {log.name}:\n" + "\n".join(tail))
        procs = self.state / "procs"
        out.append(f"procs: {sorted(p.name for p in procs.iterdir()) if procs.exists() else []}")
        out.append(f"--- daemon log:\n{self.log()[-3000:]}")
        return "\n".join(out)

    def processes(self, unit: str | None = None) -> list[psutil.Process]:
        """Live processes of this daemon's servers (of one unit, or all), as the
        kernel's process table shows them: see `Lineage`."""
        return [p for p, seen in self.lineage.servers_live() if unit is None or seen.unit == unit]

    def instances(self, unit: str) -> set[str]:
        """The instances of `unit` that still have a live process."""
        return {s.instance for _, s in self.lineage.servers_live() if s.unit == unit and s.instance}

    def kill_daemon(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Tear down: `down` if it answers, then kill whatever of ours is left.

        What is left is judged by `Lineage`, not by llmsup's marker; it is killed so
        that a failing test leaks nothing, and kept in `leftovers` (said on stderr).
        `leaked` is set when a `down` that succeeded left something.
        """
        clean_down = False
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                clean_down = self.cli("down", "-f", str(self.manifest), timeout=60).returncode == 0
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        left = self.lineage.live()
        if left and clean_down:  # the last of a stop may still be exiting
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not self.lineage.live(), 5)
            left = self.lineage.live()
        self.lineage.close()
        self.leftovers = [describe(p, s) for p, s in left]
        self.leaked = clean_down and bool(left)
        for p, _ in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if left:
            print(f"llmsup test: killed leftovers: {self.leftovers}", file=sys.stderr)


# ------------------------------------------------------------- the oracle

Ident = tuple[int, int]  # pid, start time (clock ticks after boot): never reused


@dataclass(frozen=True)
class Stat:
    """What /proc/PID/stat says of a process."""

    ppid: int
    pgid: int
    sid: int
    start: int
    zombie: bool


@dataclass(frozen=True)
class Seen:
    """A remembered process: the server it belongs to (None for the daemons and
    the CLI), that server's unit and instance, and how it was found."""

    server: Ident | None
    unit: str | None
    instance: str | None
    how: str


def read_stat(pid: int) -> Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    rest = raw.rsplit(b")", 1)[1].split()  # the name may hold spaces and parentheses
    return Stat(int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19]), rest[0] in (b"Z", b"X"))


def process_table() -> dict[int, Stat]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := read_stat(int(name))) is not None:
            out[int(name)] = st
    return out


_MOUNT = cgroup.cgroup2_mount(Path("/proc/self/mountinfo").read_text())


def _cgroup_dir(pid: int) -> Path | None:
    """The cgroup v2 directory of `pid`, when it is not the one this process is in."""
    try:
        own = cgroup.own_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
        mine = cgroup.own_cgroup(Path("/proc/self/cgroup").read_text())
    except OSError:
        return None
    if _MOUNT is None or own in (None, "/", mine):
        return None
    return _MOUNT / str(own).lstrip("/")


def _marker(pid: int) -> str:
    try:
        return psutil.Process(pid).environ().get(MARKER, "")
    except psutil.Error:
        return ""


class Lineage:
    """Every process that ever descended from a process the test launched (the
    daemon, the CLI), remembered by (pid, start time) from snapshots of the kernel's
    process table taken every `interval` s and at each question; plus processes in the
    session or process group of a server, and in a server's cgroup. None of it
    reads llmsup's records or its marker, except the marker of the server process
    itself (which llmsup launched and no engine blanks), to name the server's unit.
    """

    def __init__(self, key: str = "", interval: float | None = 0.1) -> None:
        self.key = key  # llmsup's state key: names the servers' units (none: no names)
        self.interval = interval  # of the snapshots in the background (None: none)
        self.seen: dict[Ident, Seen] = {}
        self.cgroups: dict[Ident, Path] = {}  # server -> its cgroup directory
        self.unnamed: set[Ident] = set()  # below a daemon, no server: not exec'd yet?
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def anchor(self, pid: int) -> None:
        """A process the test launched: it and all its descendants are ours."""
        st = read_stat(pid)
        if st is not None:
            with self.lock:
                self.seen.setdefault((pid, st.start), Seen(None, None, None, "launched"))
        if self.thread is None and self.interval is not None:
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()

    def _watch(self) -> None:
        assert self.interval is not None
        while not self.done.wait(self.interval):
            self.look()

    def close(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join(5)
        self.thread = None
        self.done = threading.Event()

    def look(self) -> dict[int, Stat]:
        """One snapshot: remember every new descendant, session or group member."""
        table = process_table()
        groups: dict[int, set[int]] = {}  # session or process group id -> members
        for pid, st in table.items():
            groups.setdefault(st.sid, set()).add(pid)
            groups.setdefault(st.pgid, set()).add(pid)
        with self.lock:
            for ident in list(self.unnamed):
                self._name(ident, table)
            memo: dict[int, Seen | None] = {}
            for pid in table:
                self._by_descent(pid, table, memo)
            for server in [s for s, v in self.seen.items() if v.server == s]:
                self._by_session(server, table, groups.get(server[0], set()))
        return table

    def _by_descent(
        self, pid: int, table: dict[int, Stat], memo: dict[int, Seen | None]
    ) -> Seen | None:
        if pid in memo:
            return memo[pid]
        memo[pid] = None  # a loop in a table read while processes came and went
        st = table.get(pid)
        if st is None:
            return None
        ident = (pid, st.start)
        if ident in self.seen:
            memo[pid] = self.seen[ident]
            return memo[pid]
        parent = self._by_descent(st.ppid, table, memo) if st.ppid > 1 else None
        if parent is None:
            return None
        self.seen[ident] = Seen(parent.server, parent.unit, parent.instance, "descent")
        if parent.server is None:  # below a daemon: a server, if it says so
            self.unnamed.add(ident)
            self._name(ident, table)
        memo[pid] = self.seen[ident]
        return memo[pid]

    def _name(self, ident: Ident, table: dict[int, Stat]) -> None:
        """A process below a daemon is a server once it carries the marker llmsup
        launches it with; a fork caught before its exec does not yet, so it is asked
        again at each look while it lives and belongs to no server."""
        st = table.get(ident[0])
        if st is None or st.start != ident[1] or not self.key:
            self.unnamed.discard(ident)
            return
        mark = _marker(ident[0])
        if mark.startswith(self.key + ":"):
            unit = mark.split(":", 1)[1].rsplit(":", 1)[0]
            self.seen[ident] = Seen(ident, unit, mark, "descent")
            self.unnamed.discard(ident)
            if (cg := _cgroup_dir(ident[0])) is not None:
                self.cgroups[ident] = cg

    def _by_session(self, server: Ident, table: dict[int, Stat], members: set[int]) -> None:
        label = self.seen[server]
        if not self._group_is_the_servers(server, table):
            # Every process we knew in that session or group is gone, so the kernel
            # may have given its id to someone else's new group: not ours.
            members = set()
        cg = self.cgroups.get(server)
        if cg is not None:
            try:
                members = members | {int(x) for x in (cg / "cgroup.procs").read_text().split()}
            except FileNotFoundError:
                del self.cgroups[server]  # removed: never to come back
            except (OSError, ValueError):
                pass
        for pid in members:
            st = table.get(pid)
            if st is None or st.start < server[1] or (pid, st.start) in self.seen:
                continue
            how = "session" if server[0] in (st.sid, st.pgid) else "cgroup"
            self.seen[(pid, st.start)] = Seen(server, label.unit, label.instance, how)

    def _group_is_the_servers(self, server: Ident, table: dict[int, Stat]) -> bool:
        """Whether a live process already known as this server's still sits in the
        session or group named by the server's pid (Linux reuses a pid as a new
        group's id only once no process of the old group or session is left)."""
        for (pid, start), seen in self.seen.items():
            st = table.get(pid)
            if (
                seen.server == server
                and st is not None
                and st.start == start
                and server[0] in (st.sid, st.pgid)
            ):
                return True
        return False

    def live(self) -> list[tuple[psutil.Process, Seen]]:
        """Every remembered process still alive (zombies aside), after a fresh look."""
        table = self.look()
        with self.lock:
            items = list(self.seen.items())
        out = []
        for (pid, start), seen in items:
            st = table.get(pid)
            if st is None or st.start != start or st.zombie or pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                out.append((psutil.Process(pid), seen))
        return out

    def servers_live(self) -> list[tuple[psutil.Process, Seen]]:
        """The live processes that belong to a server (not the daemons or the CLI)."""
        return [(p, s) for p, s in self.live() if s.server is not None]


def describe(p: psutil.Process, seen: Seen) -> dict[str, Any]:
    out: dict[str, Any] = {"pid": p.pid, "unit": seen.unit, "instance": seen.instance}
    out["found_by"] = seen.how
    with contextlib.suppress(psutil.Error):
        out["name"] = p.name()
    return out


@contextlib.contextmanager
def running(tmp: Path, models: str, **kw: Any) -> Iterator[Daemon]:
    d = Daemon(tmp, models, **kw)
    try:
        d.start()
        yield d
    except BaseException:
        d.stop()
        raise
    d.stop()
    assert not d.leaked, f"`down` succeeded and left: {d.leftovers}"


def names(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(p.name())
    return sorted(out)


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def time_now() -> float:
    return time.monotonic()
