"""What the state directory remembers of each launch, for a daemon that was killed.

One JSON file per launch under `STATE/procs/`, with the state directory's format
(llmsup.statedir.FORMAT) and the llmsup that wrote it. A record of an older format
is migrated in memory as it loads (fields added later have defaults; fields this
version does not know are ignored); one of a newer format is refused, and kept.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmsup.statedir import StateDir, format_of, stamp


def state_key(state_dir: Path) -> str:
    """The marker prefix of the processes a daemon of `state_dir` starts."""
    return StateDir(state_dir).key


@dataclass(frozen=True)
class Record:
    """One launched server: how to find every process of its tree again."""

    unit: str
    instance: str
    pid: int
    pgid: int
    create_time: float
    argv: list[str]
    cgroup: str | None = None  # its own cgroup v2 directory, where one could be made
    tmpdir: str | None = None  # its private TMPDIR, removed once the tree is gone
    # (pid, create time) of every process of the tree seen so far: the fallback
    # that finds a descendant which left the group and carries no environment.
    known: tuple[tuple[int, float], ...] = ()
    shm: tuple[str, ...] = ()  # /dev/shm entries the tree was seen to map or hold open
    # The shim that writes its output (llmsup.shim), the server's parent; None: a
    # launch of an older llmsup, whose output went to its daemon (never adopted).
    shim: int | None = None
    shim_create_time: float = 0.0
    fingerprint: str = ""  # of the launch (`Launch.fingerprint`): changed means replace


def _from_json(data: dict[str, Any], what: str) -> Record:
    format_of(data, what)  # format 0 (no field) has the fields of format 1: as it is
    names = {f.name for f in dataclasses.fields(Record)}
    data = {k: v for k, v in data.items() if k in names}
    data["known"] = tuple((int(p), float(t)) for p, t in data.get("known", ()))
    data["shm"] = tuple(str(s) for s in data.get("shm", ()))
    return Record(**data)


def _file(state_dir: Path, record: Record) -> Path:
    return StateDir(state_dir).records / f"{record.instance.replace(':', '_')}.json"


def save_record(state_dir: Path, record: Record) -> None:
    StateDir(state_dir).records.mkdir(parents=True, exist_ok=True)
    final = _file(state_dir, record)
    tmp = final.with_name(f".{final.stem}.tmp")
    tmp.write_text(json.dumps({**stamp(), **asdict(record)}))
    tmp.replace(final)


# Beside each record, what its shim writes (llmsup.process.child.ShimFiles).
SHIM_SUFFIXES = (".pid", ".exit", ".status")


def drop_record(state_dir: Path, record: Record) -> None:
    """Forget a launch: its record, then its shim's files."""
    record_file = _file(state_dir, record)
    record_file.unlink(missing_ok=True)
    for suffix in SHIM_SUFFIXES:
        record_file.with_suffix(suffix).unlink(missing_ok=True)


def load_records(state_dir: Path) -> list[Record]:
    """The launches the records name; StateFormatError, with nothing removed, when the
    directory or a record is of a newer format than this llmsup reads."""
    state = StateDir(state_dir)
    state.check_format()
    out = []
    for f in sorted(state.records.glob("*.json")):
        try:
            out.append(_from_json(json.loads(f.read_text()), str(f)))
        except (OSError, ValueError, TypeError, AttributeError):
            f.unlink(missing_ok=True)  # a torn write from a killed daemon
    return out
