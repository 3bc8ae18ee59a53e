"""Process plumbing that needs no daemon: log rotation, the state lock, records."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

import pytest

from llmsup.daemon import Daemon
from llmsup.errors import DaemonError
from llmsup.manifest import parse_manifest
from llmsup.plan import make_plan
from llmsup.process import Record, RotatingLog, child_env, load_records, save_record


def test_log_rotates_by_size_and_keeps_n_backups(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "m.log", max_bytes=100, backups=2)
    for i in range(10):
        log.write(f"line {i:02d} ".encode() * 5 + b"\n")  # 46 bytes
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["m.log", "m.log.1", "m.log.2"]
    assert all(p.stat().st_size <= 100 + 46 for p in tmp_path.iterdir())
    assert (
        b"line 09" in (tmp_path / "m.log").read_bytes()
        or b"line 09" in (tmp_path / "m.log.1").read_bytes()
    )


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


def test_second_daemon_on_one_state_dir_is_refused(tmp_path: Path) -> None:
    text = f"state_dir: {tmp_path}\nmodels:\n  m: {{backend: vllm, model: x}}\n"
    loaded = parse_manifest(textwrap.dedent(text), "m.yaml", {})
    plan = make_plan(loaded)

    async def both() -> None:
        first = Daemon(tmp_path / "m.yaml", loaded, plan)
        first._lock()
        second = Daemon(tmp_path / "m.yaml", loaded, plan)
        with pytest.raises(DaemonError, match="another llmsup daemon already runs"):
            second._lock()
        assert first._lock_fd is not None
        os.close(first._lock_fd)

    asyncio.run(both())
