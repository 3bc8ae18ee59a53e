"""The per-server log shim (`python -m llmsup.shim`), run as real processes:
its output, its signals, its exit, a daemon that dies under it, its cgroup."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from llmsup.process import cgroup
from llmsup.shim.main import Copy, create_time, exit_record, parse
from tests.util import small_tmpfs, wait_for

SHIM = [sys.executable, "-m", "llmsup.shim"]
PY = sys.executable

# Prints 0, 1, 2 ... every 10 ms (forever, or up to argv[1]); exits 1 on a failed write.
COUNTER = """
import itertools, sys, time
for i in itertools.count() if len(sys.argv) < 2 else range(int(sys.argv[1])):
    try:
        print(i, flush=True)
    except OSError:
        sys.exit(1)
    time.sleep(0.01)
"""


def shim_argv(tmp_path: Path, *argv: str, options: tuple[str, ...] = ()) -> list[str]:
    return [
        *SHIM,
        "--log",
        str(tmp_path / "server.log"),
        "--pid-file",
        str(tmp_path / "pid.json"),
        "--exit-file",
        str(tmp_path / "exit.json"),
        *options,
        "--",
        *argv,
    ]


def run_shim(
    tmp_path: Path, *argv: str, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        shim_argv(tmp_path, *argv, options=options),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value


def log_lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "server.log"
    return path.read_text().splitlines() if path.exists() else []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def started(argv: list[str], **kwargs: Any) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """`argv` running, and a list of pids: it and those added to the list are
    SIGKILLed, if still alive, when the test ends."""
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs) as proc:
        pids = [proc.pid]
        try:
            yield proc, pids
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ the output


def test_output_reaches_the_log_and_stdout_byte_for_byte(tmp_path: Path) -> None:
    chunks = [
        b"a partial line",
        b" ends here\n",
        b"caf\xc3",  # a character cut between two writes
        b"\xa9\n",
        b"binary \x00\xff\xfe\x80 bytes\n",
        b"".join(b"%06d %s\n" % (i, b"x" * 90) for i in range(4000)),  # 400 kB
        b"no newline at the end",
    ]
    given = tmp_path / "chunks.json"
    given.write_text(json.dumps([c.decode("latin-1") for c in chunks]))
    script = (
        "import json, os, sys, time\n"
        f"for c in json.load(open({str(given)!r})):\n"
        "    os.write(1, c.encode('latin-1')); time.sleep(0.02)\n"
        "os.write(2, b'\\nand stderr too\\n')\n"
    )
    done = run_shim(tmp_path, PY, "-c", script)
    sent = b"".join(chunks) + b"\nand stderr too\n"
    assert done.returncode == 0, done.stderr
    assert done.stdout == sent
    # The log is text: what is not UTF-8 is written as U+FFFD, the rest as it came.
    assert (tmp_path / "server.log").read_bytes() == sent.decode("utf-8", "replace").encode()


def test_the_copy_waits_for_a_slow_reader_then_says_what_it_missed(tmp_path: Path) -> None:
    size = 3_000_000  # lines of 10 bytes
    script = (
        "import os, sys, time\n"
        f"sys.stdout.buffer.write(b''.join(b'%09d\\n' % i for i in range({size} // 10)))\n"
        "sys.stdout.flush(); time.sleep(2.0); os.write(1, b'end\\n')\n"
    )
    with started(shim_argv(tmp_path, PY, "-c", script), stdout=subprocess.PIPE) as (shim, _):
        log = tmp_path / "server.log"
        # Nobody reads: the child writes all the same.
        wait_for(lambda: log.exists() and log.stat().st_size >= size, timeout=30)
        assert shim.stdout is not None
        out = shim.stdout.read()
        assert shim.wait(timeout=30) == 0
    sent = log.read_bytes()
    assert len(sent) == size + 4 and sent.endswith(b"end\n")
    copied, _, rest = out.partition(b"\n--- llmsup: ")
    assert sent.startswith(copied)
    found = re.fullmatch(
        rb"(\d+) bytes of output not copied here \(the log has them\)\n(.*)", rest, re.S
    )
    assert found, rest[:200]
    assert len(copied) + int(found[1]) == size
    assert found[2] == b"end\n"


def test_a_reader_that_never_reads_does_not_keep_the_shim(tmp_path: Path) -> None:
    script = "import sys; sys.stdout.buffer.write(b'y' * 3 * 2**20)"
    argv = shim_argv(tmp_path, PY, "-c", script, options=("--linger", "0.5"))
    with started(argv, stdout=subprocess.PIPE) as (shim, _):
        assert shim.wait(timeout=30) == 0
    assert (tmp_path / "server.log").read_bytes() == b"y" * 3 * 2**20


# ------------------------------------------------------- the daemon dies under it

PARENT = """
import os, subprocess, sys
shim = subprocess.Popen(
    sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
)
print(shim.pid, flush=True)
while os.read(shim.stdout.fileno(), 65536):
    pass
"""


def test_the_server_outlives_a_killed_daemon_and_no_line_is_lost(tmp_path: Path) -> None:
    count = 400  # 4 s at least, most of it after the kill
    argv = [PY, "-c", PARENT, *shim_argv(tmp_path, PY, "-c", COUNTER, str(count))]
    with started(argv, stdout=subprocess.PIPE) as (parent, pids):
        assert parent.stdout is not None
        shim_pid = int(parent.stdout.readline())
        pids.append(shim_pid)
        pid_file = wait_for(lambda: read_json(tmp_path / "pid.json"))
        pids.append(pid_file["pid"])
        wait_for(lambda: len(log_lines(tmp_path)) >= 30)
        parent.kill()
        parent.wait()
        assert len(log_lines(tmp_path)) < count, "the kill came too late to show anything"
        # The shim is reparented, alive, and the server goes on writing.
        wait_for(lambda: psutil.Process(shim_pid).ppid() != parent.pid)
        assert alive(shim_pid) and alive(pid_file["pid"])
        ended = wait_for(lambda: read_json(tmp_path / "exit.json"), timeout=60)
        wait_for(lambda: not alive(shim_pid), message="the shim did not exit after its child")
    assert ended["code"] == 0  # the child never met a failed write
    assert log_lines(tmp_path) == [str(i) for i in range(count)]


# ------------------------------------------------------------------ its exit


def test_the_exit_code_is_mirrored_and_recorded(tmp_path: Path) -> None:
    before = time.time()
    done = run_shim(tmp_path, PY, "-c", "import sys; print('bye'); sys.exit(3)")
    assert done.returncode == 3
    pid_file = read_json(tmp_path / "pid.json")
    ended = read_json(tmp_path / "exit.json")
    assert pid_file and ended
    assert ended == {"format": 1, "pid": pid_file["pid"], "code": 3, "at": ended["at"]}
    assert before <= ended["at"] <= time.time()
    assert pid_file["shim"] != pid_file["pid"]
    assert log_lines(tmp_path) == ["bye"]


def test_a_death_by_signal_is_mirrored_and_recorded(tmp_path: Path) -> None:
    done = run_shim(tmp_path, PY, "-c", "import os; os.kill(os.getpid(), 9)")
    assert done.returncode == -signal.SIGKILL
    ended = read_json(tmp_path / "exit.json")
    assert ended and ended["signal"] == signal.SIGKILL and "code" not in ended


def test_a_command_that_cannot_run(tmp_path: Path) -> None:
    done = run_shim(tmp_path, str(tmp_path / "no-such-server"))
    assert done.returncode == 127
    ended = read_json(tmp_path / "exit.json")
    assert ended and ended["pid"] is None and ended["code"] == 127 and ended["error"]
    assert not (tmp_path / "pid.json").exists()
    assert "cannot run" in log_lines(tmp_path)[0] and "no-such-server" in log_lines(tmp_path)[0]
    assert b"cannot run" in done.stderr


def test_a_grandchild_holding_the_pipe_keeps_the_shim_only_for_linger(tmp_path: Path) -> None:
    grandchild = "import time; time.sleep(0.3); print('late', flush=True); time.sleep(300)"
    script = (
        "import subprocess, sys\n"
        f"print(subprocess.Popen([sys.executable, '-c', {grandchild!r}]).pid, flush=True)\n"
    )
    argv = shim_argv(tmp_path, PY, "-c", script, options=("--linger", "5"))
    with started(argv, stdout=subprocess.PIPE) as (shim, pids):
        assert shim.stdout is not None
        pids.append(int(shim.stdout.readline()))
        assert shim.wait(timeout=60) == 0  # long before the grandchild's 300 s
        assert alive(pids[-1])
    assert log_lines(tmp_path) == [str(pids[-1]), "late"]


def test_the_shim_leaves_once_the_pipe_is_drained(tmp_path: Path) -> None:
    begun = time.monotonic()
    done = run_shim(tmp_path, "echo", "hi", options=("--linger", "120"))
    assert done.returncode == 0 and done.stdout == b"hi\n"
    assert time.monotonic() - begun < 60  # EOF ended it, not the linger


# ------------------------------------------------------------------ signals

HELD = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM}


def ignored(pid: int) -> set[int]:
    """The signals `pid` ignores, from /proc/PID/status."""
    text = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", text, re.M)[1], 16)  # type: ignore[index]
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


def test_signals_for_the_daemon_do_not_stop_the_shim_or_the_server(tmp_path: Path) -> None:
    argv = shim_argv(tmp_path, PY, "-c", COUNTER)
    with started(argv, stdout=subprocess.DEVNULL) as (shim, pids):
        pid_file = wait_for(lambda: read_json(tmp_path / "pid.json"))
        child = pid_file["pid"]
        pids.append(child)
        assert pid_file["shim"] == shim.pid and psutil.Process(child).ppid() == shim.pid
        assert pid_file["create_time"] == pytest.approx(psutil.Process(child).create_time())
        wait_for(lambda: log_lines(tmp_path))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            shim.send_signal(sig)
        seen = len(log_lines(tmp_path))
        wait_for(lambda: len(log_lines(tmp_path)) > seen + 30, message="the server stopped")
        assert shim.poll() is None
        assert not ignored(child) & HELD  # the server gets the default actions
        os.kill(child, signal.SIGTERM)  # as the daemon stops a server
        assert shim.wait(timeout=30) == -signal.SIGTERM
    ended = read_json(tmp_path / "exit.json")
    assert ended and ended["pid"] == child and ended["signal"] == signal.SIGTERM


def test_a_signal_the_shim_was_told_to_ignore_stays_ignored_for_the_server(
    tmp_path: Path,
) -> None:
    def nohup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    argv = shim_argv(tmp_path, "sleep", "300")
    with started(argv, stdout=subprocess.DEVNULL, preexec_fn=nohup) as (shim, pids):
        child = wait_for(lambda: read_json(tmp_path / "pid.json"))["pid"]
        pids.append(child)
        # SIGPIPE too, which Python ignores in the shim (a Python server ignores it itself).
        assert ignored(child) & {*HELD, signal.SIGPIPE} == {signal.SIGHUP}
        os.kill(child, signal.SIGKILL)
        assert shim.wait(timeout=30) == -signal.SIGKILL


# ------------------------------------------------------------------ cgroup


@pytest.fixture
def fresh_cgroup() -> Iterator[Path]:
    mount = cgroup.cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    if os.geteuid() != 0 or mount is None:
        pytest.skip("a cgroup v2 of our own needs root and a cgroup2 mount")
    path = mount / f"llmsup-shim-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a cgroup under {mount}: {e.strerror}")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            (path / "cgroup.kill").write_text("1")
        wait_for(lambda: _removed(path), timeout=10)


def _removed(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def test_the_server_is_in_its_cgroup_from_its_first_instruction(
    tmp_path: Path, fresh_cgroup: Path
) -> None:
    done = run_shim(tmp_path, "cat", "/proc/self/cgroup", options=("--cgroup", str(fresh_cgroup)))
    assert done.returncode == 0, done.stderr
    v2 = [line for line in log_lines(tmp_path) if line.startswith("0::")]
    assert v2 and v2[0].endswith("/" + fresh_cgroup.name), log_lines(tmp_path)


def test_a_cgroup_it_cannot_join_is_said_and_the_server_runs(tmp_path: Path) -> None:
    nowhere = tmp_path / "no-such-cgroup"
    done = run_shim(tmp_path, "echo", "running", options=("--cgroup", str(nowhere)))
    assert done.returncode == 0
    first, second = log_lines(tmp_path)
    assert (
        first.startswith(f"--- llmsup: cannot join the cgroup {nowhere}")
        and "runs outside" in first
    )
    assert second == "running"


# ------------------------------------------------------------ rotation, full disk


def test_the_log_rotates_through_the_shim(tmp_path: Path) -> None:
    script = (
        "import time\n"
        "for i in range(100): print(str(i).rjust(999, '.'), flush=True); time.sleep(0.005)"
    )
    done = run_shim(tmp_path, PY, "-c", script, options=("--max-bytes", "10000", "--backups", "2"))
    assert done.returncode == 0
    logs = sorted(p.name for p in tmp_path.glob("server.log*"))
    assert logs == ["server.log", "server.log.1", "server.log.2"]
    kept = [
        int(line.lstrip("."))
        for name in reversed(logs)
        for line in (tmp_path / name).read_text().splitlines()
    ]
    assert kept == list(range(100 - len(kept), 100))  # the newest, in order, none missing


def test_a_full_disk_drops_log_output_and_never_the_server(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    count = 400
    with small_tmpfs(disk, "1m"):
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            f.write(b"\0" * 2**21)  # fills the disk: the log cannot be written
        options = ("--log", str(disk / "server.log"))
        argv = [*SHIM, *options, "--", PY, "-c", COUNTER, str(count)]
        with started(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as (shim, _):
            assert shim.stdout is not None and shim.stderr is not None
            for _ in range(50):  # the copy shows the server going on meanwhile
                shim.stdout.readline()
            filler.unlink()
            shim.stdout.read()
            assert shim.wait(timeout=60) == 0  # the server never met a failed write
            warned = shim.stderr.read().decode()
        text = (disk / "server.log").read_text()
    assert "disk full" in warned
    assert re.search(r"--- llmsup: \d+ bytes of output dropped while this log could not", text)
    assert text.endswith(f"\n{count - 1}\n")


# ------------------------------------------------------------------ pure parts


def test_options() -> None:
    opts = parse(["--log", "x.log", "--linger", "0.5", "--", "vllm", "serve", "--port", "1"])
    assert opts.argv == ("vllm", "serve", "--port", "1")
    assert opts.log == Path("x.log") and opts.linger == 0.5 and opts.cgroup is None


@pytest.mark.parametrize(
    "args",
    [
        ["--log", "x"],  # no `--`
        ["--log", "x", "--"],  # no command
        ["--", "true"],  # no log
        ["--log", "x", "--backups", "-1", "--", "true"],
        ["--log", "x", "--linger", "inf", "--", "true"],
    ],
)
def test_wrong_options_exit_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(args)
    assert e.value.code == 2


def test_exit_records() -> None:
    assert exit_record(12, 0, 5.0) == {"format": 1, "pid": 12, "code": 0, "at": 5.0}
    assert exit_record(12, -9, 5.0) == {"format": 1, "pid": 12, "signal": 9, "at": 5.0}


def test_create_time_as_psutil_says() -> None:
    stat = "42 (a (weird) name) S 1 42 42 0 -1 4194560 " + " ".join(["0"] * 12) + " 1234 0"
    assert create_time(stat, 1000.0, 100) == 12.34 + 1000.0


def test_the_copy_keeps_a_bounded_backlog_and_says_what_it_left_out() -> None:
    r, w = os.pipe()
    try:
        copy = Copy(w, backlog=100)
        big = b"z" * 2**20  # more than the pipe holds
        copy.write(big)
        assert copy.waiting
        copy.write(b"a" * 10)  # beyond the backlog: left out
        copy.write(b"b")  # and all that follows, until the backlog drains
        copy.flush()
        got = b""
        while copy.waiting:
            got += os.read(r, 2**20)
            copy.flush()
        got += os.read(r, 2**20)
        assert got == big + b"\n--- llmsup: 11 bytes of output not copied here (the log has them)\n"
        copy.write(b"after\n")
        assert os.read(r, 100) == b"after\n"
        os.close(r)
        r = -1
        copy.write(b"to nobody\n")  # EPIPE: the copy ends, quietly
        assert not copy.open and not copy.waiting
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
