"""`up` with no model that can be launched exits non-zero with the reasons, in the
foreground and with -d; one model that launches is enough to keep supervising."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmsup.client import alive, call
from tests.util import FAKES_DIR, free_port

LLMSUP = [sys.executable, "-m", "llmsup.cli"]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def manifest(tmp: Path, models: str) -> Path:
    path = tmp / "models.yaml"
    path.write_text(
        f"state_dir: {tmp / 'state'}\n"
        "defaults: {stop_timeout: 2s, health: {interval: 300ms, startup_timeout: 20s}}\n"
        f"models:\n{models}"
    )
    return path


def run_up(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{FAKES_DIR}:/usr/bin:/bin", "FAKE_LOAD_TIME": "0.2"}
    env.pop("LLMSUP_STATE_DIR", None)
    return subprocess.run(
        [*LLMSUP, "up", *extra, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def unlaunchable(tmp: Path, port: int) -> Path:
    return manifest(
        tmp,
        f"  a: {{backend: vllm, model: org/a, port: {port}}}\n"
        f"  b: {{backend: command, command: [no-such-server-x], port: {free_port()}}}\n",
    )


@pytest.mark.parametrize("mode", [["--foreground"], ["-d"]], ids=["foreground", "detached"])
def test_up_with_no_model_launched_exits_non_zero_with_the_reasons(
    tmp_path: Path, held_port: int, mode: list[str]
) -> None:
    path = unlaunchable(tmp_path, held_port)
    r = run_up(path, *mode)
    sock = tmp_path / "state" / "control.sock"
    if alive(sock):  # a daemon that stayed (the bug): stop it before failing
        subprocess.run([*LLMSUP, "down", "-f", str(path)], capture_output=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no model could be launched, so there is nothing to supervise" in r.stderr
    assert f"{path}:4:3: models.a: port {held_port} on 127.0.0.1 is held by" in r.stderr
    assert f"{path}:5:3: models.b: no-such-server-x: not found on PATH (searched: " in r.stderr
    assert "fix these and run `llmsup up` again" in r.stderr
    assert "supervising" not in r.stderr
    assert "Traceback" not in r.stderr
    assert "daemon started" not in r.stdout
    assert not alive(sock) and not sock.exists()


def test_one_model_launched_is_enough_to_supervise(tmp_path: Path) -> None:
    path = manifest(
        tmp_path,
        f"  a: {{backend: vllm, model: org/a, port: {free_port()}}}\n"
        f"  b: {{backend: command, command: [no-such-server-x], port: {free_port()}}}\n",
    )
    r = run_up(path, "-d")
    sock = tmp_path / "state" / "control.sock"
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "daemon started" in r.stdout
        _, data = call(sock, "GET", "/v1/status")
        states = {row["name"]: row["state"] for row in data["models"]}
        assert states["b"] == "FAILED"
        assert states["a"] != "FAILED"
        assert data["launch"] == "under way"
    finally:
        env = {**os.environ, "PATH": f"{FAKES_DIR}:/usr/bin:/bin"}
        subprocess.run([*LLMSUP, "down", "-f", str(path)], capture_output=True, timeout=60, env=env)
    assert not alive(sock)


def test_a_daemon_that_hangs_up_mid_request_is_a_clean_error(tmp_path: Path) -> None:
    """As when a daemon exits while a command asks it something: no traceback."""
    import threading

    from llmsup.errors import DaemonError

    sock_path = tmp_path / "control.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen()

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # a reset, no answer

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        with pytest.raises(DaemonError, match="closed the connection without an answer"):
            call(sock_path, "GET", "/v1/status", timeout=10)
    finally:
        t.join(10)
        server.close()
