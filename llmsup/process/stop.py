"""Stopping a launch's whole tree, and watching the trees while they run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil

from llmsup.process import cgroup, litter, tracking
from llmsup.process.child import Child
from llmsup.process.records import Record, save_record
from llmsup.process.tracking import members

TRACK_INTERVAL = 2.0  # seconds between snapshots of the servers' trees


def clean(
    cg: Path | None, tmpdir: Path | str | None, shm: set[str], since: float | None = None
) -> None:
    """Once a tree is gone: its cgroup, its TMPDIR, its shared memory."""
    if cg is not None:
        deadline = time.monotonic() + 5.0
        while not cgroup.remove(cg) and time.monotonic() < deadline:
            time.sleep(0.05)  # populated until the kernel has finished the exits
    litter.remove_tmpdir(str(tmpdir) if tmpdir else None)
    litter.remove_shm(shm, since)


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error, OSError):
            p.send_signal(sig)


async def _wait_gone(find: Callable[[], list[psutil.Process]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not await asyncio.to_thread(find):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)


async def terminate(
    find: Callable[[], list[psutil.Process]],
    grace: float,
    leader: Child | None = None,
    cg: Path | None = None,
) -> list[int]:
    """SIGTERM, `grace` seconds, then SIGKILL everything `find` returns (and
    `cgroup.kill` on `cg`: the kernel kills what forks meanwhile, too).

    SIGCONT follows SIGTERM so a stopped (SIGSTOP) process can act on it.
    Returns the pids that had to be SIGKILLed. Completes only when none remain.
    """
    procs = await asyncio.to_thread(find)
    if not procs and leader is None:
        return []  # a second look costs a scan of the process table (a restore's)
    _signal(procs, signal.SIGTERM)
    _signal(procs, signal.SIGCONT)
    if leader is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(leader.wait(), grace)
    if await _wait_gone(find, grace if leader is None else 0.5):
        return []
    killed: list[int] = []
    if cg is not None:
        cgroup.kill(cg)
    for _ in range(50):  # children may fork while we kill; go until none is left
        procs = await asyncio.to_thread(find)
        if not procs:
            break
        killed += [p.pid for p in procs]
        _signal(procs, signal.SIGKILL)
        await _wait_gone(find, 0.5)
    if leader is not None:
        await leader.wait()
    return sorted(set(killed))


async def stop(record: Record, grace: float, leader: Child | None = None) -> list[int]:
    """Stop every process of a launch, then remove what it leaves (cgroup,
    TMPDIR, shared memory). Returns the pids that had to be SIGKILLed."""
    cg = Path(record.cgroup) if record.cgroup else None
    first = await asyncio.to_thread(members, record)
    shm = set(record.shm) | await asyncio.to_thread(litter.shm_of, [p.pid for p in first])
    killed = await terminate(lambda: members(record), grace, leader, cg)
    since = record.create_time or None  # None: a cgroup without a record
    await asyncio.to_thread(clean, cg, record.tmpdir, shm, since)
    return killed


def track(children: list[Child]) -> list[Child]:
    """One snapshot of every server's tree (blocking: run it in a thread): each
    child's record learns the processes and shared memory seen; returns the
    children whose record changed (to be saved)."""
    changed = []
    snaps = tracking.snapshot([c.record for c in children])
    for child, (rec, alive) in zip(children, snaps, strict=True):
        # Segments still on disk: one the tree removed itself is no litter.
        shm = {p for p in rec.shm if os.path.exists(p)} | litter.shm_of(alive)
        if shm != set(rec.shm):
            rec = replace(rec, shm=tuple(sorted(shm)))
        child.pids = alive
        if rec != child.record:
            child.record = rec
            changed.append(child)
    return changed


def save(state_dir: Path, child: Child) -> None:
    save_record(state_dir, child.record)


async def reap_loop(interval: float = 5.0) -> None:
    """Wait for orphans that came back to us (subreaper) once they exit: on
    SIGCHLD, and every `interval` seconds in case signals were merged."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    loop.add_signal_handler(signal.SIGCHLD, wake.set)
    try:
        while True:
            tracking.reap_orphans()
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), interval)
    finally:
        loop.remove_signal_handler(signal.SIGCHLD)


def strays() -> list[psutil.Process]:
    """Orphans of our servers that came back to us and that no record names."""
    out = []
    for pid in tracking.strays():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out
