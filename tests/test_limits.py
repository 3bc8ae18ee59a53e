"""Open files: the gateway's share of them, and launches that find none free."""

from __future__ import annotations

import errno
import os
import resource
import signal
from pathlib import Path

import aiohttp
import psutil
import pytest

from llmsup.limits import SHORTAGE_BACKOFF_MAX, connection_cap, launch_retry
from tests.supervisor_util import Daemon, gone
from tests.util import free_port, wait_for


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
def test_a_launch_out_of_descriptors_is_retried_for_ever_and_not_counted(code: int) -> None:
    e = OSError(code, os.strerror(code))
    retries = [launch_retry(e, n) for n in range(1, 1001)]
    assert all(r is not None for r in retries)  # no last attempt: never FAILED for it
    delays = [r.delay for r in retries if r is not None]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == delays[-1] == SHORTAGE_BACKOFF_MAX
    assert delays == sorted(delays)
    first = retries[0]
    assert first is not None and "out of file descriptors" in first.detail
    assert "not counted" in first.detail


def test_a_shortage_is_found_where_libraries_wrap_it() -> None:
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as inner:
            raise RuntimeError("spawn failed") from inner
    except RuntimeError as outer:
        assert launch_retry(outer, 1) is not None
    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None)
    wrapped = aiohttp.ClientConnectorError(key, OSError(errno.EMFILE, "Too many open files"))
    assert launch_retry(wrapped, 1) is not None


@pytest.mark.parametrize(
    "e",
    [
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        PermissionError(errno.EACCES, "Permission denied"),
        OSError(errno.ENOMEM, "Cannot allocate memory"),
        RuntimeError("not an OSError"),
    ],
)
def test_other_launch_errors_are_the_models(e: BaseException) -> None:
    assert launch_retry(e, 1) is None


def test_the_gateway_leaves_a_reserve_for_supervision() -> None:
    assert connection_cap(256, 1) == (256 - 128 - 4) // 2
    assert connection_cap(1024, 4) == 440
    assert connection_cap(1_048_576, 100) > 500_000
    assert connection_cap(100, 50) == 1  # a limit too low still lets one client in


def test_a_daemon_out_of_descriptors_retries_the_launch_and_never_gives_up(
    tmp_path: Path,
) -> None:
    """The daemon's soft limit is cut to 0 (every new descriptor fails with EMFILE)
    while its server is killed: the respawn is retried, more often than max_restarts
    (3 here) allows failures, and succeeds once descriptors are free again."""
    d = Daemon(tmp_path, f"a: {{backend: vllm, model: org/a, port: {free_port()}}}\n")
    try:
        d.start()
        first = d.wait_state("a", "READY")
        assert d.proc is not None
        daemon = psutil.Process(d.proc.pid)
        tree = [p.pid for p in psutil.Process(first["pid"]).children(recursive=True)]
        assert tree  # the fake, like vLLM, runs an EngineCore and a Worker
        limit = daemon.rlimit(resource.RLIMIT_NOFILE)
        daemon.rlimit(resource.RLIMIT_NOFILE, (0, limit[1]))
        try:
            os.kill(first["pid"], signal.SIGKILL)
            wait_for(
                lambda: d.log().count("out of file descriptors") >= 4,  # > max_restarts
                60,
                message=f"no retries: {d.log()[-2000:]}",
            )
        finally:
            daemon.rlimit(resource.RLIMIT_NOFILE, limit)
        row = d.wait_state("a", "READY", 60)
        assert row["pid"] != first["pid"] and row["restarts"] <= 1
        wait_for(lambda: gone(tree), 30, message=f"the killed server's tree outlived it: {tree}")
        assert "FAILED" not in d.log()
        assert "not counted" in d.log()
    finally:
        d.stop()
