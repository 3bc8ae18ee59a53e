"""What a daemon that is gone (killed, or stuck) left behind in its state directory:
shown by `status`, stopped by `down`, only while no daemon holds the directory
(`StateDir.vacant`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmsup.cli.common import Target
from llmsup.errors import LlmsupError


def rows(target: Target) -> list[dict[str, Any]]:
    """What the state directory's records name: per launch, its processes still alive."""
    from llmsup import process

    out = []
    for rec in process.load_records(target.state.path):
        pids = sorted(p.pid for p in process.members(rec))
        out.append({"unit": rec.unit, "pid": rec.pid, "alive": pids, "argv": list(rec.argv)})
    return out


def stop(target: Target) -> list[tuple[str, list[int]]]:
    """Stop every process the records name, and any other carrying the state dir's
    marker, each with its model's stop_timeout; (unit, pids that were alive)."""
    import asyncio

    from llmsup import process
    from llmsup.supervise import memory

    key = target.state.key + ":"
    found = [(rec, process.members(rec)) for rec in process.load_records(target.state.path)]
    known = {p.pid for _, procs in found for p in procs}
    strays = [p for p in process.marked_with(key) if p.pid not in known]
    if not found and not strays:
        return []
    grace = _stop_timeouts(target.manifest)

    async def stop_all() -> None:
        async def stop(rec: process.Record) -> None:
            await process.stop(rec, grace(rec.unit))  # and its cgroup, TMPDIR, shared memory
            process.drop_record(target.state.path, rec)

        await asyncio.gather(*(stop(rec) for rec, _ in found))
        await process.terminate(lambda: process.marked_with(key), grace(""))

    asyncio.run(stop_all())
    memory.forget(target.state.path)  # stopped for good: a next `up` starts afresh
    out = [(rec.unit, sorted(p.pid for p in procs)) for rec, procs in found]
    return out + ([("unrecorded", sorted(p.pid for p in strays))] if strays else [])


def _stop_timeouts(manifest: Path) -> Callable[[str], float]:
    """The manifest's stop_timeout per unit; 30 s (its default) if it cannot be read."""
    from llmsup.manifest import load_manifest

    try:
        return load_manifest(manifest).manifest.stop_timeout
    except (LlmsupError, OSError):
        return lambda _unit: 30.0
