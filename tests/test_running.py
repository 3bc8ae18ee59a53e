"""The registry of running daemons: where it lies, what counts as running."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from llmsup import running
from llmsup.statedir import StateDir


def test_places_of_a_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMSUP_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)  # no /run/user/4242 here
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert running.runtime_dir() == tmp_path / "llmsup"
    # a service run as the user has no XDG_RUNTIME_DIR: the CLI looks there too
    assert running._places() == [tmp_path / "llmsup", Path("/tmp/llmsup-4242")]
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert running.runtime_dir() == Path("/tmp/llmsup-4242")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert running.runtime_dir() == Path("/run/llmsup")
    monkeypatch.setenv("LLMSUP_RUNTIME_DIR", str(tmp_path / "mine"))
    assert running.runtime_dir() == tmp_path / "mine"


def test_register_then_unregister(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSUP_RUNTIME_DIR", str(tmp_path / "run"))
    state = StateDir(tmp_path / "state")
    f = running.register(tmp_path / "m.yaml", state)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    live, dead = running.entries()
    assert [(e.pid, e.manifest, e.state_dir, e.socket) for e in live] == [
        (os.getpid(), str(tmp_path / "m.yaml"), str(state.path), str(state.path / "control.sock"))
    ]
    assert dead == []
    running.unregister(state)
    assert not f.exists()
    assert running.entries() == ([], [])


def test_a_reused_or_dead_pid_is_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("LLMSUP_RUNTIME_DIR", str(run))
    gone = subprocess.Popen(["true"])
    gone.wait()

    def entry(pid: int, started: int) -> dict[str, object]:
        return {"pid": pid, "started": started, "manifest": "m", "state_dir": "s", "socket": "x"}

    (run / "reused.json").write_text(json.dumps(entry(os.getpid(), 1)))  # not our start time
    (run / "dead.json").write_text(json.dumps(entry(gone.pid, 1)))
    (run / "torn.json").write_text('{"pid": 1')
    live, dead = running.entries()
    assert live == [] and sorted(e.file.name for e in dead if e.file) == [
        "dead.json",
        "reused.json",
    ]
    assert not (run / "torn.json").exists()
    for e in dead:
        running.forget(e)
    assert list(run.iterdir()) == []


def test_a_directory_others_may_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)
    monkeypatch.setenv("LLMSUP_RUNTIME_DIR", str(run))
    with pytest.raises(running.UnsafeRuntimeDir, match="writable only by it"):
        running.register(tmp_path / "m.yaml", StateDir(tmp_path))
    (run / "planted.json").write_text(
        json.dumps({"pid": os.getpid(), "started": None, "manifest": "m", "state_dir": "s",
                    "socket": "x"})
    )  # fmt: skip
    assert running.entries() == ([], [])
