"""Finding every process of a launch, and taking back the orphans.

A launch's members are the union of what each mechanism sees, so that none is
relied on alone:
- its cgroup (where one could be made): the kernel's own membership;
- its process group (every server runs in a session of its own), for the
  processes created after the launch;
- the `LLMSUP_INSTANCE` marker in a process's environment (vLLM's EngineCore
  and workers zero theirs with setproctitle, so this one is often blind);
- the (pid, create time) of every process of the tree seen so far, kept in
  the record by `snapshot`: it finds a worker that called setsid() and has no
  environment, even after the server (or the daemon) died;
- and then every descendant of the above.

The daemon is a child subreaper (`become_subreaper`): a process orphaned by a
server's death is re-parented to the daemon, not to init, so it stays in the
daemon's tree, and `reap_orphans` waits for it once it exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from llmsup.process import cgroup
from llmsup.process.records import Record

MARKER = "LLMSUP_INSTANCE"
SAME_START = 0.05  # seconds: two create times this close are one process's


@dataclass(frozen=True)
class Seen:
    """One live process as a scan of the process table saw it."""

    proc: psutil.Process
    marker: str | None
    pgid: int
    create_time: float
    ppid: int = 0


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
        for p in psutil.process_iter(["create_time", "status", "ppid"]):
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
            seen.append(Seen(p, mark, pgid, created, p.info["ppid"] or 0))
        self._markers = markers  # forget the dead
        return seen


TABLE = ProcessTable()


def _marker(p: psutil.Process) -> str | None:
    try:
        return p.environ().get(MARKER)
    except (psutil.Error, OSError):
        return None


def members_in(record: Record, seen: list[Seen], in_cgroup: set[int]) -> list[Seen]:
    """The processes of one launch in a scan (pure). `in_cgroup`: its cgroup's pids."""
    known = dict(record.known)
    group = record.pgid > 0 and not _group_reused(record, seen)
    found = {
        s.proc.pid: s
        for s in seen
        if s.marker == record.instance
        or s.proc.pid in in_cgroup
        or abs(known.get(s.proc.pid, -1e9) - s.create_time) < SAME_START
        or (
            s.marker is None  # environment unreadable, but in our group and young enough
            and group
            and s.pgid == record.pgid
            and s.create_time >= record.create_time - 1.0
        )
    }
    children: dict[int, list[Seen]] = defaultdict(list)
    for s in seen:
        children[s.ppid].append(s)
    todo = list(found)
    while todo:  # and every descendant of those
        for c in children.get(todo.pop(), []):
            if c.proc.pid not in found and c.create_time >= record.create_time - 1.0:
                found[c.proc.pid] = c
                todo.append(c.proc.pid)
    return list(found.values())


def _group_reused(record: Record, seen: list[Seen]) -> bool:
    """Whether the server's pid, which named its process group, now belongs to
    another process: the kernel frees a group's id only once no process of the
    group is left, so whatever group has that id now is someone else's."""
    return record.pgid == record.pid and any(
        s.proc.pid == record.pid and abs(s.create_time - record.create_time) >= SAME_START
        for s in seen
    )


def cgroup_pids(record: Record) -> set[int]:
    return cgroup.procs(Path(record.cgroup)) if record.cgroup else set()


def members(record: Record, table: ProcessTable = TABLE) -> list[psutil.Process]:
    """Every live process of this launch (see the module's docstring)."""
    in_cgroup = cgroup_pids(record)
    return [s.proc for s in members_in(record, table.scan(), in_cgroup)]


def marked_with(
    prefix: str, table: ProcessTable = TABLE, *, keep: set[str] | frozenset[str] = frozenset()
) -> list[psutil.Process]:
    """Processes whose marker starts with `prefix` (a state key: all of one daemon's),
    but for the markers in `keep` (servers adopted by the daemon)."""
    return [
        s.proc
        for s in table.scan()
        if s.marker is not None and s.marker.startswith(prefix) and s.marker not in keep
    ]


def tree_pids(pid: int) -> set[int]:
    """A process and its descendants (cheap: no environment reads)."""
    try:
        root = psutil.Process(pid)
        return {pid} | {c.pid for c in root.children(recursive=True)}
    except psutil.Error:
        return set()


def snapshot(
    records: Iterable[Record], table: ProcessTable = TABLE
) -> list[tuple[Record, set[int]]]:
    """One scan for many launches: each record with the processes of its tree
    remembered in `known`, and the pids of its live members."""
    seen = table.scan()
    out = []
    for rec in records:
        found = members_in(rec, seen, cgroup_pids(rec))
        # The live tree only: a dead process needs no finding, and the record of a
        # server that runs for months must not grow with every child it ever had.
        known = {rec.pid: rec.create_time} | {s.proc.pid: s.create_time for s in found}
        if known != dict(rec.known):
            rec = _with_known(rec, known)
        out.append((rec, {s.proc.pid for s in found}))
    return out


def _with_known(rec: Record, known: dict[int, float]) -> Record:
    return replace(rec, known=tuple(sorted(known.items())))


# ------------------------------------------------------------ subreaper


PR_SET_CHILD_SUBREAPER = 36
# The servers this process spawned (pid -> Popen): only their own Popen reaps
# them, so that `Child.exited` gets their exit status.
_OWN: dict[int, subprocess.Popen[bytes]] = {}
OWN_LOCK = threading.Lock()  # held while a spawn forks and registers its child


def become_subreaper() -> bool:
    """Orphans of our servers come back to us instead of init (Linux 3.4+)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def own(proc: subprocess.Popen[bytes]) -> None:
    """Register a child we spawned (call with OWN_LOCK held)."""
    _OWN[proc.pid] = proc


# The servers' shims we started: reaped as orphans are once they exit, but no
# stray (a shim drains its server's output after the server is gone).
_SHIMS: set[int] = set()


def shim(pid: int) -> None:
    """Register a shim we started."""
    _SHIMS.add(pid)


def _children() -> set[int]:
    out: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        tasks = []
    for t in tasks:
        with (
            contextlib.suppress(OSError, ValueError),
            open(f"/proc/self/task/{t}/children", encoding="ascii") as f,
        ):
            out |= {int(x) for x in f.read().split()}
    return out


def strays() -> list[int]:
    """Our children that no spawn of ours owns: orphans re-parented to us."""
    with OWN_LOCK:
        return [pid for pid in _children() if _not_ours(pid) and pid not in _SHIMS]


def _not_ours(pid: int) -> bool:
    p = _OWN.get(pid)
    return p is None or p.returncode is not None


def reap_orphans() -> list[int]:
    """Wait for the orphans that exited; never for a server whose Popen will.

    Skips the round while a spawn forks (the new child is not registered yet)."""
    if not OWN_LOCK.acquire(blocking=False):
        return []
    try:
        for pid in [pid for pid, p in _OWN.items() if p.returncode is not None]:
            del _OWN[pid]
        reaped = []
        for pid in _children():
            if not _not_ours(pid):
                continue
            try:
                result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                continue
            if result is not None:
                reaped.append(pid)
                _SHIMS.discard(pid)
        return reaped
    finally:
        OWN_LOCK.release()
