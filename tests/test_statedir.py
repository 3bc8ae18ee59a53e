"""The state directory: its layout, where it is found, and the daemon's lock held,
refused and released across processes."""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmsup import process
from llmsup.errors import DaemonError
from llmsup.process import litter
from llmsup.statedir import StateDir

# A daemon in another process: takes the lock, says so, releases it on a line of stdin.
HOLDER = """
import sys
from pathlib import Path
from llmsup.statedir import StateDir
lock = StateDir(Path(sys.argv[1])).acquire()
print("held", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
sys.stdin.readline()
"""
ACQUIRE = "import sys; from pathlib import Path; from llmsup.statedir import StateDir\n"
ACQUIRE += "StateDir(Path(sys.argv[1])).acquire()"


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "state")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "held\n"
        yield proc
        proc.kill()


def _acquire_elsewhere(state: StateDir) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ACQUIRE, str(state.path)], capture_output=True, text=True
    )


def test_layout(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    assert state.socket == tmp_path / "s" / "control.sock"
    assert state.lock_file == tmp_path / "s" / "daemon.lock"
    assert state.daemon_log == tmp_path / "s" / "daemon.log"
    assert state.logs == tmp_path / "s" / "logs"
    assert state.log("m") == tmp_path / "s" / "logs" / "m.log"
    assert state.records == tmp_path / "s" / "procs"
    assert state.key == process.state_key(tmp_path / "s") and len(state.key) == 10


def test_records_and_tmpdirs_go_where_it_says(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))  # TMPDIRs: 64 characters at most
    request.addfinalizer(lambda: shutil.rmtree(short))
    monkeypatch.chdir(short)
    state = StateDir(Path("s"))  # relative: TMPDIRs get the full path all the same
    record = process.Record("m", f"{state.key}:m:abc", 10, 10, 1.0, ["x"])
    process.save_record(state.path, record)
    assert [f.name for f in state.records.iterdir()] == [f"{state.key}_m_abc.json"]
    assert state.tmp == short.resolve() / "s" / "tmp"
    assert litter.make_tmpdir(state.path, record.instance) == state.tmp / "abc"


def test_where_it_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSUP_STATE_DIR", str(tmp_path / "env"))
    assert StateDir.default() == StateDir(tmp_path / "env")
    assert StateDir.named(None) == StateDir(tmp_path / "env")
    assert StateDir.named("/srv/x") == StateDir(Path("/srv/x"))
    manifest = tmp_path / "m.yaml"
    monkeypatch.setenv("WHERE", str(tmp_path / "w"))
    manifest.write_text("state_dir: ${WHERE}/state\nmodels: {}\n")
    assert StateDir.of_file(manifest) == StateDir(tmp_path / "w" / "state")
    manifest.write_text("models: [unclosed\n")
    assert StateDir.of_file(manifest) == StateDir(tmp_path / "env")
    assert StateDir.of_file(tmp_path / "absent.yaml") == StateDir(tmp_path / "env")
    assert StateDir(tmp_path / "w" / ".." / "env").same(StateDir(tmp_path / "env"))


def test_created_private_or_for_a_group(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "a" / "s")
    state.create()
    assert state.path.stat().st_mode & 0o777 == 0o700
    group = grp.getgrgid(os.getgid()).gr_name
    shared = StateDir(tmp_path / "g")
    shared.create(group)
    assert shared.path.stat().st_mode & 0o777 == 0o750
    assert shared.path.stat().st_gid == os.getgid()


def test_a_socket_path_too_long_says_so(tmp_path: Path) -> None:
    state = StateDir(tmp_path / ("x" * 120))
    with pytest.raises(DaemonError) as e:
        _ = state.socket
    assert str(e.value) == (
        f"control socket path {state.path / 'control.sock'} is longer than 107 bytes; "
        "choose a shorter state_dir"
    )


def test_the_lock_is_refused_while_another_process_holds_it(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    state = StateDir(tmp_path / "state")
    assert state.lock_file.read_text() == f"{holder.pid}\n"
    assert state.lock_file.stat().st_mode & 0o777 == 0o600
    with pytest.raises(DaemonError) as refused:
        state.acquire()
    assert str(refused.value) == (
        f"another llmsup daemon already runs on {state.path} "
        "(use `llmsup reload` or `llmsup up` to hand it a manifest)"
    )
    with pytest.raises(DaemonError) as held, state.vacant():
        pass
    assert str(held.value) == (
        f"a daemon (pid {holder.pid}) holds {state.path} but does not answer on "
        f"{state.socket}: it may be starting, or stuck; retry in a moment, "
        f"or stop it with `kill {holder.pid}`"
    )
    assert state.lock_file.read_text() == f"{holder.pid}\n"  # refusals change nothing


def test_a_released_lock_is_free_and_holds_the_new_pid(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    state = StateDir(tmp_path / "state")
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("release\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == "released\n"
    assert holder.poll() is None  # released while the holder still runs
    lock = state.acquire()
    assert state.lock_file.read_text() == f"{os.getpid()}\n"
    assert "another llmsup daemon already runs" in _acquire_elsewhere(state).stderr
    lock.release()
    lock.release()  # twice is harmless
    assert _acquire_elsewhere(state).returncode == 0


def test_a_killed_holder_leaves_the_lock_free(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    holder.kill()
    holder.wait()
    state = StateDir(tmp_path / "state")
    with state.vacant():
        pass
    state.acquire().release()


def test_vacant_keeps_daemons_out_and_creates_nothing(tmp_path: Path) -> None:
    never = StateDir(tmp_path / "never")
    with never.vacant():
        pass
    assert not never.path.exists()
    state = StateDir(tmp_path / "state")
    state.acquire().release()
    with state.vacant():
        refused = _acquire_elsewhere(state)
    assert refused.returncode != 0
    assert "another llmsup daemon already runs" in refused.stderr
    assert _acquire_elsewhere(state).returncode == 0
