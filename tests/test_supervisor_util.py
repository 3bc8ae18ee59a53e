"""The tests' own oracle (`Lineage`) sees what llmsup's marker cannot: a blanked
EngineCore, a worker's helper that left the session with an empty environment,
and the processes a SIGKILLed daemon left behind, which `Daemon.stop` kills."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil

from llmsup.process import MARKER
from tests.supervisor_util import Daemon
from tests.util import free_port, wait_for

ESCAPE = {"FAKE_WORKER_ESCAPE": "1", "LLMSUP_NO_CGROUP": "1"}


def kernel_tree(pid: int) -> dict[int, float]:
    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            out[p.pid] = p.create_time()
    return out


def unmarked(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if MARKER not in psutil.Process(pid).environ():
                out.add(pid)
    return out


def escaped(server: int, pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if os.getsid(pid) != server:
                out.add(pid)
    return out


def full_tree(d: Daemon) -> tuple[int, dict[int, float]]:
    """The server of `m` and its tree, once the escaped helper is in it and the
    EngineCore and Worker have blanked their environment (they do it as they start)."""

    def ready() -> tuple[int, dict[int, float]] | None:
        server = int(d.status()["m"]["pid"])
        t = kernel_tree(server)
        hidden = unmarked(set(t))
        return (server, t) if escaped(server, hidden) and len(hidden) >= 3 else None

    return wait_for(ready, 20, message="no escaped helper beside a blanked EngineCore and Worker")


def test_processes_include_blanked_and_escaped_ones(tmp_path: Path) -> None:
    d = Daemon(tmp_path, f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n", ESCAPE)
    try:
        d.start()
        d.wait_all_ready()
        _, tree = full_tree(d)
        assert len(unmarked(set(tree))) >= 3  # EngineCore, Worker, helper
        assert {p.pid for p in d.processes("m")} >= set(tree)
        assert d.processes("other") == []
        assert d.cli("down", "-f", str(d.manifest)).returncode == 0
        assert d.processes() == []
    finally:
        d.stop()
    assert d.leftovers == [] and not d.leaked


def test_stop_kills_what_a_killed_daemon_left(tmp_path: Path) -> None:
    d = Daemon(tmp_path, f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n", ESCAPE)
    try:
        d.start()
        d.wait_all_ready()
        _, tree = full_tree(d)
        d.kill_daemon()  # its servers live on, orphans now
        assert all(psutil.pid_exists(pid) for pid in tree)
    finally:
        d.stop()
    left = {row["pid"] for row in d.leftovers}
    assert left >= set(tree) and not d.leaked
    assert {row["found_by"] for row in d.leftovers} == {"descent"}

    def all_gone() -> bool:
        for pid, created in tree.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    return False
        return True

    wait_for(all_gone, 10, message=f"left alive: {d.leftovers}")
