"""The CLI against a running (or killed) daemon: finding it, one `-f`, what it says."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from llmsup.process import load_records
from tests.supervisor_util import LLMSUP, Daemon, gone, running
from tests.util import free_port, wait_for


def _daemon(tmp: Path, models: str, **env: str) -> Daemon:
    """A daemon whose registration goes to a runtime directory of this test alone."""
    return Daemon(tmp, models, {"LLMSUP_RUNTIME_DIR": str(tmp / "run"), **env})


def _cli(
    d: Daemon, *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The CLI with the daemon's environment, run where no models.yaml lies."""
    where = cwd or d.dir / "elsewhere"
    where.mkdir(exist_ok=True)
    return subprocess.run(
        [*LLMSUP, *args], env=d.env, cwd=where, capture_output=True, text=True, timeout=timeout
    )


def _row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(name + " "))


def test_down_after_the_daemon_was_killed_stops_what_it_left(tmp_path: Path) -> None:
    d = _daemon(tmp_path, f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n")
    try:
        d.start()
        pid = d.wait_all_ready()["m"]["pid"]
        tree = [p.pid for p in d.processes("m")]
        d.kill_daemon()
        # status, no -f: the killed daemon's registration still points at its records
        r = _cli(d, "status")
        assert r.returncode == 3, r.stdout + r.stderr
        assert f"no llmsup daemon is running on {d.state}" in r.stderr
        assert "start one" not in r.stderr  # the daemon's leftovers come first
        row = _row(r.stdout, "m")
        assert str(pid) in row and "unsupervised" in row
        assert f"llmsup down -f {d.manifest}" in r.stderr
        r = _cli(d, "status", "--json")
        assert r.returncode == 3
        assert json.loads(r.stdout)["error"].count("start one") == 1
        left = json.loads(r.stdout)["leftovers"]
        assert [(x["unit"], x["pid"]) for x in left] == [("m", pid)] and left[0]["alive"]
        assert not gone(tree), "status must not stop anything"
        r = _cli(d, "down", "-f", str(d.manifest))
        assert r.returncode == 0, r.stderr
        assert "stopped what it left behind" in r.stdout
        assert f"m: pid {pid}" in r.stdout
        assert gone(tree) and d.processes() == []
        assert load_records(d.state) == []
        r = _cli(d, "down", "-f", str(d.manifest))
        assert r.returncode == 3 and "nothing it started is left" in r.stderr
    finally:
        d.stop()


def test_a_second_up_with_another_manifest_changes_nothing(tmp_path: Path) -> None:
    d = _daemon(tmp_path, f"a: {{backend: vllm, model: org/a, port: {free_port()}}}\n")
    other = tmp_path / "other.yaml"
    b = f"b: {{backend: vllm, model: org/b, port: {free_port()}}}"
    other.write_text(f"state_dir: {d.state}\nmodels:\n  {b}\n")
    try:
        d.start()
        pid = d.wait_all_ready()["a"]["pid"]
        r = _cli(d, "up", "-f", str(other))
        assert r.returncode == 1
        assert f"a daemon already runs {d.manifest}" in r.stderr
        assert f"llmsup reload -f {other}" in r.stderr and "--replace" in r.stderr
        assert "Traceback" not in r.stderr
        rows = d.status()
        assert list(rows) == ["a"] and rows["a"]["pid"] == pid and rows["a"]["state"] == "READY"
        r = _cli(d, "up", "--replace", "-f", str(other))
        assert r.returncode == 0, r.stderr
        assert "added: b" in r.stdout and "removed: a" in r.stdout
        d.wait_all_ready()
        assert list(d.status()) == ["b"]
    finally:
        d.stop()


def test_commands_without_f_find_the_running_daemon(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _daemon(tmp_path / "one", f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n")
    two = _daemon(tmp_path / "two", f"n: {{backend: vllm, model: org/n, port: {free_port()}}}\n")
    two.env = one.env  # one runtime directory for both
    try:
        r = _cli(one, "up", "-d", "-f", str(one.manifest))
        assert r.returncode == 0, r.stderr
        assert f"follow it with `llmsup status -f {one.manifest}`" in r.stdout
        one.wait_all_ready()
        r = _cli(one, "status")
        assert r.returncode == 0, r.stderr
        assert _row(r.stdout, "m").split()[2] == "READY"
        assert _cli(one, "restart", "m").returncode == 0
        r = _cli(one, "reload")
        assert r.returncode == 0 and "unchanged: m" in r.stdout
        two.start()
        r = _cli(one, "status")
        assert r.returncode == 1
        assert "2 llmsup daemons are running" in r.stderr
        assert str(one.manifest) in r.stderr and str(two.manifest) in r.stderr
        assert "-f MANIFEST" in r.stderr
        # `down` stops the one named; then the other is the only one
        assert _cli(one, "down", "-f", str(one.manifest)).returncode == 0
        r = _cli(one, "status")
        assert r.returncode == 0 and _row(r.stdout, "n")
        assert _cli(one, "down").returncode == 0
        wait_for(lambda: two.proc is not None and two.proc.poll() is not None, 30)
        assert list((tmp_path / "one" / "run").glob("*.json")) == []
        r = _cli(one, "status")
        assert r.returncode == 3
        # no daemon: the hint names the file the user gave, once
        r = _cli(one, "status", "-f", str(two.manifest))
        assert r.returncode == 3
        assert f"start one with `llmsup up -f {two.manifest}`" in r.stderr
        assert r.stderr.count("start one") == 1
        r = _cli(one, "status", "-f", "nosuch.yaml")
        assert "start one with `llmsup up -f MANIFEST` (there is no nosuch.yaml)" in r.stderr
    finally:
        with contextlib.suppress(Exception):
            _cli(one, "down", "-f", str(one.manifest))
        one.stop()
        two.stop()


def test_stale_registration_is_ignored_and_removed(tmp_path: Path) -> None:
    d = _daemon(tmp_path, "m: {backend: vllm, model: org/m}\n")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()
    entry = {
        "pid": dead.pid,
        "started": 1,
        "manifest": str(d.manifest),
        "state_dir": str(tmp_path / "gone"),
        "socket": str(tmp_path / "gone" / "control.sock"),
    }
    (run / "x.json").write_text(json.dumps(entry))
    r = _cli(d, "status")
    assert r.returncode == 3
    assert str(tmp_path / "gone") not in r.stderr  # not the stale entry's state dir
    assert list(run.glob("*.json")) == []


FOLLOW = ["logs", "-f", "m"]


def test_file_before_the_command_and_follow_in_logs(tmp_path: Path) -> None:
    d = _daemon(tmp_path, f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n")
    with contextlib.ExitStack() as stack:
        stack.callback(d.stop)
        d.start()
        d.wait_all_ready()
        r = _cli(d, "-f", str(d.manifest), "status", "m")
        assert r.returncode == 0 and "READY" in r.stdout, r.stderr
        r = _cli(d, "-f", str(d.manifest), "logs", "-n", "200", "m")
        assert r.returncode == 0, r.stderr
        assert "Starting vLLM server on" in r.stdout
        out, err = tmp_path / "follow.out", tmp_path / "follow.err"
        with open(out, "wb") as sink, open(err, "wb") as errors:
            follow = subprocess.Popen(
                [sys.executable, "-X", "faulthandler", *LLMSUP[1:], "-f", str(d.manifest), *FOLLOW],
                env=d.env,
                stdout=sink,
                stderr=errors,
            )
        stack.callback(follow.wait)  # runs after the kill below: callbacks run last-in first
        stack.callback(follow.kill)
        wait_for(lambda: "Starting vLLM server on" in out.read_text(), 20)
        assert follow.poll() is None, "-f after logs follows"
        follow.send_signal(signal.SIGINT)
        try:
            code = follow.wait(20)
        except subprocess.TimeoutExpired:  # where it is stuck: faulthandler's dump
            follow.send_signal(signal.SIGABRT)
            follow.wait(10)
            raise AssertionError(f"logs -f ignored SIGINT: {err.read_text()}") from None
        assert code == 0
        assert err.read_text() == ""
        r = _cli(d, "logs", "--file", str(d.manifest), "nosuch")
        assert r.returncode == 1
        assert "no model named 'nosuch' (known: m)" in r.stderr


def test_status_rows_tell_the_current_run(tmp_path: Path) -> None:
    port = free_port()
    models = f"""\
    m: {{backend: vllm, model: org/m, port: {port}, gpu_memory_utilization: 0.4}}
    bad:
      backend: vllm
      model: org/bad
      port: {free_port()}
      gpu_memory_utilization: 0.4
      env: {{FAKE_FAIL_LOAD: "1"}}
    """
    with running(tmp_path, models, extra_env={"LLMSUP_RUNTIME_DIR": str(tmp_path / "run")}) as d:
        d.wait_state("m", "READY")
        row = d.wait_state("bad", "FAILED", 30)
        r = _cli(d, "status", "-f", str(d.manifest))
        line = _row(r.stdout, "bad")
        assert row["reason"] in line, line  # why it failed, not the last load step
        assert line.split()[7] == "-"  # no health time for a failed server
        assert "GPU checks skipped" not in r.stdout + r.stderr
        # stopped: no health time; then its port is taken, and a start fails on it
        assert _cli(d, "stop", "-f", str(d.manifest), "m").returncode == 0
        line = _row(_cli(d, "status", "-f", str(d.manifest)).stdout, "m")
        assert line.split()[2] == "STOPPED" and line.split()[7] == "-"
        with socket.socket() as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
            holder.bind(("127.0.0.1", port))
            holder.listen()
            assert _cli(d, "start", "-f", str(d.manifest), "m").returncode == 0
            d.wait_state("m", "FAILED")
            r = _cli(d, "status", "-f", str(d.manifest))
            assert f"port {port} on 127.0.0.1 is held by" in _row(r.stdout, "m")
            assert "m: last log lines" not in r.stdout  # those were the run before's
        assert _cli(d, "start", "-f", str(d.manifest), "m").returncode == 0
        d.wait_state("m", "READY")
        line = _row(_cli(d, "status", "-f", str(d.manifest)).stdout, "m")
        assert "held by" not in line and line.split()[7].endswith("ms")
        assert "GPU checks skipped" not in d.log()


def test_up_and_status_say_where_the_gateway_listens(tmp_path: Path) -> None:
    gw = free_port()
    d = _daemon(tmp_path, f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n")
    d.manifest.write_text(d.manifest.read_text() + f"gateway:\n  port: {gw}\n  api_keys: [k-1]\n")
    try:
        d.start()
        d.wait_all_ready()
        want = f"gateway: http://127.0.0.1:{gw}/v1 (listening on 127.0.0.1:{gw}), API key required"
        wait_for(lambda: want in d.log(), 10, message=d.log())
        r = _cli(d, "status", "-f", str(d.manifest))
        assert want in r.stdout
        r = _cli(d, "status", "--json", "-f", str(d.manifest))
        info = json.loads(r.stdout)["gateway"]
        assert info["port"] == gw and info["keys_required"] and info["listening"]
    finally:
        d.stop()


def test_ctrl_c_on_up_says_so_and_exits_130(tmp_path: Path) -> None:
    d = _daemon(tmp_path, f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n")
    try:
        d.start()
        d.wait_all_ready()
        tree = [p.pid for p in d.processes("m")]
        assert d.proc is not None
        d.proc.send_signal(signal.SIGINT)
        assert d.proc.wait(30) == 130
        assert "interrupted (Ctrl-C); every model stopped" in d.log()
        assert "Traceback" not in d.log()
        assert gone(tree) and d.processes() == []
        assert list((tmp_path / "run").glob("*.json")) == []
    finally:
        d.stop()


def test_runtime_dir_of_someone_else_is_not_used(tmp_path: Path) -> None:
    """A registration directory others may write to is neither read nor written."""
    d = _daemon(tmp_path, f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n")
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    try:
        d.start()
        d.wait_all_ready()
        assert list(run.iterdir()) == []
        assert "not registered in" in d.log()
        r = _cli(d, "status")
        assert r.returncode == 3  # not found, not trusted
    finally:
        d.stop()
