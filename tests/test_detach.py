"""Starting a detached daemon: a daemon that exits before it answers is reported
with its exit code and this start's log lines, not an earlier start's."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmsup import detach
from llmsup.client import alive
from llmsup.statedir import StateDir
from tests.util import free_port


def test_a_daemon_that_exits_shows_this_starts_lines_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMSUP_STATE_DIR", raising=False)
    state = tmp_path / "state"
    state.mkdir()
    earlier = [f"an earlier start's line {i}" for i in range(60)]
    (state / "daemon.log").write_text("\n".join(earlier) + "\n")
    manifest = tmp_path / "models.yaml"
    manifest.write_text(
        f"state_dir: {state}\n"
        f"models:\n  b: {{backend: command, command: [no-such-server-x], port: {free_port()}}}\n"
    )
    sock = StateDir(state).socket
    # Generous: the suite runs real engines beside this test, and a start under that
    # load can take long; an exit ends the wait at once.
    result = detach.start(manifest, StateDir(state), untrusted=False, timeout=240)
    assert isinstance(result, detach.Exited), result
    assert result.code == 1
    assert result.log == state / "daemon.log"
    text = "\n".join(result.tail)
    assert "no model could be launched, so there is nothing to supervise" in text
    assert "no-such-server-x: not found on PATH" in text
    assert "earlier start" not in text
    assert 0 < len(result.tail) <= detach.TAIL_LINES
    # The log keeps both starts: it is appended to.
    assert (state / "daemon.log").read_text().startswith(earlier[0])
    assert not alive(sock)
