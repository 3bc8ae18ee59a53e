"""Process plumbing that needs no daemon: the state lock, records, spawning."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from llmsup import process
from llmsup.process import (
    MARKER,
    ProcessTable,
    Record,
    Seen,
    child_env,
    litter,
    load_records,
    marked_with,
    members,
    save_record,
)
from tests.util import wait_for


def test_child_env_drops_systemd_variables() -> None:
    env = child_env(
        {"PATH": "/bin", "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "LLMSUP_INSTANCE": "old"},
        {"CUDA_VISIBLE_DEVICES": "0"},
    )
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}


def test_torn_record_is_dropped(tmp_path: Path) -> None:
    rec = Record("m", "k:m:1", 10, 10, 1.0, ["vllm"])
    save_record(tmp_path, rec)
    (tmp_path / "procs" / "torn.json").write_text("{")
    assert load_records(tmp_path) == [rec]
    assert not (tmp_path / "procs" / "torn.json").exists()


def _spawn_marked(tmp_path: Path, instance: str) -> tuple[subprocess.Popen[bytes], int]:
    """A server in a session of its own with our marker, whose child leaves the
    group (setsid) and a stranger: returns the server and the escapee's pid."""
    script = tmp_path / "tree.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                     start_new_session=True)
            print(child.pid, flush=True)
            time.sleep(60)
            """
        )
    )
    env = {**os.environ, MARKER: instance}
    server = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, start_new_session=True
    )
    assert server.stdout is not None
    with server.stdout:
        return server, int(server.stdout.readline())


def test_members_finds_the_group_and_marked_escapees_only(tmp_path: Path) -> None:
    server, escapee = _spawn_marked(tmp_path, "k1:m:abc")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = Record("m", "k1:m:abc", server.pid, server.pid, time.time() - 5, ["x"])
        table = ProcessTable()
        found = {p.pid for p in members(rec, table)}
        assert found == {server.pid, escapee}
        assert os.getpgid(escapee) != server.pid  # found by its marker, not its group
        assert {p.pid for p in marked_with("k1:", table)} == {server.pid, escapee}
        assert marked_with("k2:", table) == []
    finally:
        for pid in (server.pid, escapee, stranger.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        server.wait()
        stranger.wait()


def test_a_scan_is_never_older_than_the_question(tmp_path: Path) -> None:
    table = ProcessTable()
    assert marked_with("k3:", table) == []
    server, escapee = _spawn_marked(tmp_path, "k3:m:def")
    try:
        assert {p.pid for p in marked_with("k3:", table)} == {server.pid, escapee}
    finally:
        for pid in (server.pid, escapee):
            os.kill(pid, signal.SIGKILL)
        server.wait()
    assert table.scans == 2


def test_callers_that_ask_during_a_scan_share_the_next_one() -> None:
    class Gated(ProcessTable):
        def __init__(self) -> None:
            super().__init__()
            self.entered = threading.Event()
            self.gate = threading.Event()
            self.asked = 0
            self._count = threading.Lock()

        def scan(self) -> list[Seen]:
            with self._count:
                self.asked += 1
            return super().scan()

        def _scan(self) -> list[Seen]:
            self.entered.set()
            self.gate.wait(10)
            return super()._scan()

    table = Gated()
    results: list[list[Seen]] = []
    first = threading.Thread(target=lambda: results.append(table.scan()))
    first.start()
    assert table.entered.wait(10)
    waiting = [threading.Thread(target=lambda: results.append(table.scan())) for _ in range(8)]
    for t in waiting:
        t.start()
    wait_for(lambda: table.asked == 9, 10)  # all eight have asked while the first runs
    table.gate.set()
    for t in [first, *waiting]:
        t.join(10)
    assert table.scans == 2  # the running one, and one shared by the eight
    assert len({id(r) for r in results[1:]}) == 1


def test_terminate_with_nothing_to_stop_scans_the_table_once() -> None:
    """A new daemon's sweep for leftovers most often finds none: one scan of the
    process table then, not a second to see them gone (100 servers: ~50 ms each)."""
    table = ProcessTable()
    killed = asyncio.run(process.terminate(lambda: marked_with("k4:", table), 5.0))
    assert killed == []
    assert table.scans == 1


def test_a_spawn_stopped_while_it_forks_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that lands while the worker thread forks: the server it starts anyway
    must not run on unsupervised."""
    real = subprocess.Popen
    forking, made = threading.Event(), threading.Event()
    started: list[subprocess.Popen[bytes]] = []

    def gated_popen(*args: Any, **kw: Any) -> subprocess.Popen[bytes]:
        forking.set()
        made.wait(10)  # a busy host: the fork/exec goes on after the stop
        started.append(real(*args, **kw))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", gated_popen)  # the module llmsup.process uses
    log = process.LogSpec(tmp_path / "m.log", max_bytes=1 << 20, backups=1)
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]

    async def body() -> None:
        task = asyncio.create_task(
            process.spawn(
                "m", argv, dict(os.environ), "k9", log, lambda _line: None, state_dir=tmp_path
            )
        )
        assert await asyncio.to_thread(forking.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        made.set()  # the server starts now, after its spawn was cancelled
        while not started or started[0].poll() is None:  # killed and reaped
            await asyncio.sleep(0.02)

    try:
        asyncio.run(asyncio.wait_for(body(), 20))
        assert started and started[0].returncode == -signal.SIGKILL
        assert marked_with("k9:", ProcessTable()) == []
    finally:
        for p in marked_with("k9:", ProcessTable()):
            p.kill()


def test_a_private_tmpdir_holds_vllm_sockets_even_under_long_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM binds TMPDIR/<uuid> unix sockets (107 bytes at most): neither a deep
    state dir nor a deep daemon TMPDIR may push a server's TMPDIR past that."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    made = litter.make_tmpdir(deep / "state", "0123456789:unit:abcdef012345")
    try:
        assert len(str(made)) <= litter.MAX_TMPDIR
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(made / str(uuid.uuid4())))
    finally:
        litter.remove_tmpdir(str(made))
