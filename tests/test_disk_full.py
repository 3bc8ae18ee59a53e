"""A full disk never hurts a server: the daemon and a fake vLLM that prints a lot,
their state directory on a small tmpfs (root only) that a filler file fills up."""

from __future__ import annotations

import errno
import json
import os
import urllib.request
from pathlib import Path

import psutil

from tests.supervisor_util import Daemon, running
from tests.util import free_port, small_tmpfs, wait_for

SPAM = 200_000  # bytes/s of progress lines: the 4 MiB tmpfs would fill in 20 s


def fill(path: Path) -> None:
    """Write zeros to `path` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def answers(port: int) -> bool:
    body = json.dumps({"model": "org/m", "messages": [{"role": "user", "content": "hi"}]})
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status == 200 and bool(json.load(r)["choices"])


def warnings(d: Daemon) -> list[str]:
    return [line for line in d.log().splitlines() if "dropping output" in line]


def test_a_full_disk_never_hurts_a_server(tmp_path: Path) -> None:
    port = free_port()
    models = f'm: {{backend: vllm, model: org/m, port: {port}, env: {{FAKE_LOG_SPAM: "{SPAM}"}}}}\n'
    with small_tmpfs(tmp_path / "state", "4m"), running(tmp_path, models) as d:
        row = d.wait_all_ready()["m"]
        pid, log = row["pid"], Path(row["log"])
        fill(d.state / "filler")

        # Output is dropped and counted; the server goes on as if nothing happened.
        row = wait_for(lambda: (r := d.status()["m"])["log_warning"] and r, 10)
        assert row["log_warning"] == f"{log}: disk full (No space left on device): dropping output"
        dropped = row["log_dropped_bytes"]
        wait_for(lambda: d.status()["m"]["log_dropped_bytes"] >= dropped + SPAM // 2, 10)
        row = d.status()["m"]
        assert (row["state"], row["pid"]) == ("READY", pid)
        assert psutil.Process(pid).is_running() and answers(port)
        r = d.cli("status", "-f", str(d.manifest))
        assert r.returncode == 0, r.stderr
        assert f"warning: m: {row['log_warning']}" in r.stdout, r.stdout
        assert len(warnings(d)) == 1, warnings(d)

        # Space returns: writing resumes, and the log says what it lacks.
        (d.state / "filler").unlink()
        row = wait_for(lambda: (r := d.status()["m"])["log_warning"] == "" and r, 10)
        assert (row["state"], row["pid"]) == ("READY", pid)
        text = log.read_text(errors="replace")
        note = "bytes of output dropped while this log could not be written"
        assert [line[:12] for line in text.splitlines() if note in line] == ["--- llmsup: "]
        wait_for(lambda: log.stat().st_size > len(text.encode()) + SPAM // 10, 10)
        assert "writing again" in d.log() and len(warnings(d)) == 1
        assert answers(port)
