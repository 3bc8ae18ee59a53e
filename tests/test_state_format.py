"""The state directory's format: an older one (or none) is read and its servers
stopped; a newer one is refused before anything is signalled, removed or written."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
import pytest

from llmsup import __version__
from llmsup.errors import StateFormatError
from llmsup.process import Record, load_records, save_record
from llmsup.statedir import FORMAT, StateDir
from tests.supervisor_util import Daemon
from tests.util import free_port

NEWER = {"format": FORMAT + 1, "written_by": "llmsup 9.0.0"}


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A server that a killed daemon left: a process in a session of its own."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def _record(state: StateDir, proc: subprocess.Popen[bytes]) -> Record:
    created = psutil.Process(proc.pid).create_time()
    return Record("m", f"{state.key}:m:abc", proc.pid, proc.pid, created, ["sleep", "300"])


def _write_record(state: StateDir, data: dict[str, Any]) -> Path:
    """A record as some llmsup wrote it, in the file name llmsup gives it."""
    state.records.mkdir(parents=True, exist_ok=True)
    path = state.records / f"{state.key}_m_abc.json"
    path.write_text(json.dumps(data))
    return path


def _daemon(tmp: Path) -> Daemon:
    d = Daemon(tmp, f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n")
    d.env["LLMSUP_RUNTIME_DIR"] = str(tmp / "run")  # its registration: this test's alone
    return d


def test_unversioned_state_is_read_and_new_records_say_their_format(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    rec = Record("m", f"{state.key}:m:abc", 10, 10, 1.0, ["vllm"], known=((10, 1.0),))
    _write_record(state, asdict(rec))  # as llmsup wrote it before formats
    assert state.read_format() == 0
    assert load_records(tmp_path) == [rec]
    save_record(tmp_path, rec)  # in the place of the old one
    [f] = state.records.glob("*.json")
    data = json.loads(f.read_text())
    assert data["format"] == FORMAT and data["written_by"] == f"llmsup {__version__}"
    assert load_records(tmp_path) == [rec]


def test_acquire_writes_the_format_and_refuses_a_newer_one(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "old")
    lock = state.acquire()
    lock.release()
    data = json.loads(state.format_file.read_text())
    assert data == {"format": FORMAT, "written_by": f"llmsup {__version__}"}
    assert state.read_format() == FORMAT

    newer = StateDir(tmp_path / "newer")
    newer.path.mkdir()
    newer.format_file.write_text(json.dumps(NEWER))
    with pytest.raises(
        StateFormatError, match=rf"llmsup 9\.0\.0 \(format {FORMAT + 1}\): upgrade llmsup"
    ):
        newer.acquire()
    assert sorted(p.name for p in newer.path.iterdir()) == ["format"]  # no lock, nothing


def test_a_format_file_this_llmsup_cannot_read_is_refused(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.format_file.write_text("format: 2\n")
    with pytest.raises(StateFormatError, match=f"{state.format_file} is not a format"):
        load_records(tmp_path)


@pytest.mark.parametrize("newer", ["directory", "record"])
def test_a_newer_format_is_refused_and_nothing_is_stopped(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], newer: str
) -> None:
    d = _daemon(tmp_path)
    state = StateDir(d.state)
    rec = asdict(_record(state, sleeper))
    if newer == "directory":
        state.path.mkdir()
        state.format_file.write_text(json.dumps(NEWER))
        path = _write_record(state, {**rec, **NEWER})
        named = str(state.path)
    else:  # a record whose fields this llmsup cannot parse: not a torn write
        rec["leader"] = rec.pop("pid")
        path = _write_record(state, {**rec, **NEWER})
        named = str(path)
    before = sorted(p.name for p in state.path.rglob("*")), path.read_text()
    try:
        for args in (["up"], ["up", "-d"], ["down"], ["status"]):
            r = d.cli(*args, "-f", str(d.manifest), timeout=60)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert (
                f"this llmsup ({__version__}) reads state formats up to {FORMAT}; {named} was "
                f"written by llmsup 9.0.0 (format {FORMAT + 1}): upgrade llmsup, or run "
                "`llmsup down` with the newer one first"
            ) in r.stderr, (args, r.stderr)
    finally:
        d.stop()
    assert sleeper.poll() is None, "nothing may be signalled"
    # the record kept as it was; no lock, log or format file written
    assert (sorted(p.name for p in state.path.rglob("*")), path.read_text()) == before


def test_a_daemon_stops_what_an_older_record_names_and_writes_the_format(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    d = _daemon(tmp_path)
    state = StateDir(d.state)
    path = _write_record(state, asdict(_record(state, sleeper)))  # format 0: no field
    try:
        d.start()  # it answers once it has stopped what its records name
        assert sleeper.wait(10) is not None
        assert not path.exists()
        data = json.loads(state.format_file.read_text())
        assert data == {"format": FORMAT, "written_by": f"llmsup {__version__}"}
    finally:
        d.stop()
