"""The daemon against real fake servers: processes, ports, signals, HTTP."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil

from llmsup.client import call
from tests.supervisor_util import Daemon, gone, running
from tests.util import free_port, wait_for

FAKE_LOAD = "0.3"


def three_models() -> str:
    return f"""\
    big:
      backend: vllm
      model: org/big
      gpus: [0, 1]
      gpu_memory_utilization: 0.9
      port: {free_port()}
      env: {{FAKE_LOAD_TIME: "{FAKE_LOAD}"}}
    small:
      backend: vllm
      model: org/small
      served_name: small-chat
      gpus: [2]
      port: {free_port()}
      api_key: sekrit-key
      env: {{FAKE_LOAD_TIME: "{FAKE_LOAD}"}}
    llama:
      backend: ollama
      model: hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q8_0
      gpus: [3]
      port: {free_port()}
    """


def server_pid(d: Daemon, name: str) -> int:
    pid = d.status()[name]["pid"]
    assert pid, d.status()[name]
    return int(pid)


def tree(pid: int) -> list[psutil.Process]:
    """A server and its descendants, from the kernel's process table: an oracle that
    does not depend on the marker (vLLM's EngineCore and workers blank theirs)."""
    try:
        server = psutil.Process(pid)
        return [server, *server.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def full_tree(d: Daemon, name: str, size: int) -> list[psutil.Process]:
    """The tree of `name`'s server once it has `size` processes (children start late)."""

    def complete() -> list[psutil.Process] | None:
        procs = tree(server_pid(d, name))
        return procs if len(procs) == size else None

    return wait_for(complete, message=f"{name}: never {size} processes")


def titles(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.cmdline())
            out.append("tracker" if "resource_tracker" in cmd else p.cmdline()[0].split("/")[-1])
    return sorted(out)


def test_three_models_reach_ready_and_down_leaves_nothing(tmp_path: Path) -> None:
    with running(tmp_path, three_models()) as d:
        d.wait_all_ready()
        r = d.cli("status", "--json", "-f", str(d.manifest))
        assert r.returncode == 0, r.stderr
        rows = {m["name"]: m for m in json.loads(r.stdout)["models"]}
        assert {n: m["state"] for n, m in rows.items()} == {
            "big": "READY",
            "small": "READY",
            "llama": "READY",
        }
        # TP=2: the API server, its resource tracker, its EngineCore, a worker per rank.
        big = full_tree(d, "big", 5)
        assert titles(big)[:3] == ["VLLM::EngineCore", "VLLM::Worker_TP0", "VLLM::Worker_TP1"]
        assert "tracker" in titles(big)
        assert any("runner" in " ".join(p.cmdline()) for p in d.processes("llama"))
        table = d.cli("status", "-f", str(d.manifest)).stdout
        assert "READY" in table and "small" in table
        # the key reached vLLM through its environment, not argv
        small = psutil.Process(server_pid(d, "small"))
        assert small.environ()["VLLM_API_KEY"] == "sekrit-key"
        assert "sekrit-key" not in " ".join(small.cmdline())
        assert "NOTIFY_SOCKET" not in small.environ()
        assert "sekrit-key" not in table
        pids = [p.pid for name in ("big", "small", "llama") for p in tree(server_pid(d, name))]
        assert len(pids) >= 10
        r = d.cli("down", "-f", str(d.manifest))
        assert r.returncode == 0, r.stderr
        assert gone(pids)
        assert d.processes() == []
        assert d.proc is not None and d.proc.wait(5) == 0


def test_sigkill_of_server_restarts_and_reaps_orphans(tmp_path: Path) -> None:
    port = free_port()
    models = f"""\
    m:
      backend: vllm
      model: org/m
      gpus: [0, 1]
      port: {port}
      env: {{FAKE_LOAD_TIME: "{FAKE_LOAD}"}}
    """
    with running(tmp_path, models) as d:
        d.wait_all_ready()
        old = server_pid(d, "m")
        old_tree = [p.pid for p in full_tree(d, "m", 5)]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: d.status()["m"]["restarts"] == 1, 10)
        row = d.wait_state("m", "READY")
        assert row["pid"] != old
        assert "killed by SIGKILL" in row["last_exit"]
        assert gone(old_tree), "the orphaned EngineCore, workers and tracker must be gone"
        full_tree(d, "m", 5)


def test_sigkill_of_engine_core_is_detected(tmp_path: Path) -> None:
    models = f"""\
    m: {{backend: vllm, model: org/m, port: {free_port()}}}
    """
    with running(tmp_path, models) as d:
        d.wait_all_ready()
        old = server_pid(d, "m")
        old_tree = full_tree(d, "m", 4)  # server, tracker, EngineCore, Worker (TP=1)
        core = next(p for p in old_tree if p.cmdline()[0] == "VLLM::EngineCore")
        core.kill()
        wait_for(lambda: d.status()["m"]["restarts"] == 1, 15)
        row = d.wait_state("m", "READY")
        assert row["pid"] != old
        # vLLM answers 503, then exits with code 0: the cause comes from its log.
        assert row["last_exit"].endswith("(EngineCore died)"), row
        assert gone([p.pid for p in old_tree])


def test_sigstop_hang_is_detected_and_nothing_stays(tmp_path: Path) -> None:
    models = f"""\
    m: {{backend: vllm, model: org/m, port: {free_port()}}}
    """
    with running(tmp_path, models) as d:
        d.wait_all_ready()
        old = server_pid(d, "m")
        old_tree = [p.pid for p in full_tree(d, "m", 4)]
        os.kill(old, signal.SIGSTOP)
        wait_for(lambda: d.status()["m"]["restarts"] == 1, 15)
        row = d.wait_state("m", "READY")
        assert "unhealthy" in row["last_exit"]
        assert gone(old_tree)


def test_hung_engine_behind_healthy_health_needs_the_deep_probe(tmp_path: Path) -> None:
    models = f"""\
    m:
      backend: vllm
      model: org/m
      port: {free_port()}
      health: {{deep_probe: true, deep_interval: 300ms}}
      env: {{FAKE_LOAD_TIME: "{FAKE_LOAD}", FAKE_HEALTH_OK_BUT_HUNG_AFTER: "0.5"}}
    """
    with running(tmp_path, models) as d:
        d.wait_all_ready()
        row = wait_for(lambda: (r := d.status()["m"])["restarts"] >= 1 and r, 15)
        assert "deep probes (1-token completions) failed in a row" in row["last_exit"], row
        log = d.cli("logs", "--file", str(d.manifest), "m", "-n", "500").stdout
        # The tests' default health.failures is 2: one failure noted, the second ends it.
        assert "deep probe failed (1/2)" in log and "hung: 2 deep probes" in log, log


def test_crash_loop_ends_in_failed_with_reason_and_log(tmp_path: Path) -> None:
    models = f"""\
    m:
      backend: vllm
      model: org/m
      port: {free_port()}
      env: {{FAKE_EXIT_CODE: "3", FAKE_EXIT_AFTER: "0"}}
    """
    with running(tmp_path, models) as d:
        row = d.wait_state("m", "FAILED", 20)
        assert "exited with code 3" in row["reason"]
        assert "gave up after 3 restarts" in row["reason"]
        assert row["restarts"] == 3
        assert row["tail"], "the last log lines come with FAILED"
        r = d.cli("status", "-f", str(d.manifest))
        assert "FAILED" in r.stdout and "last log lines" in r.stdout
        assert d.processes("m") == []
        # stays FAILED until `llmsup restart`
        r = d.cli("restart", "-f", str(d.manifest), "m")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: d.status()["m"]["restarts"] >= 4, 10)


def test_reload_restarts_only_the_changed_model(tmp_path: Path) -> None:
    pa, pb = free_port(), free_port()
    base = f"""\
    a: {{backend: vllm, model: org/a, port: {pa}, gpus: [0]}}
    b: {{backend: vllm, model: org/b, port: {pb}, gpus: [1]}}
    """
    with running(tmp_path, base) as d:
        rows = d.wait_all_ready()
        before = {n: r["pid"] for n, r in rows.items()}
        d.write(base.replace("org/b", "org/b2"))
        r = d.cli("reload", "-f", str(d.manifest))
        assert r.returncode == 0, r.stderr
        assert "restarted: b" in r.stdout
        rows = d.wait_all_ready()
        assert rows["a"]["pid"] == before["a"]
        assert rows["b"]["pid"] != before["b"]
        assert gone([before["b"]])
        # an invalid manifest changes nothing and its errors reach the CLI
        d.manifest.write_text(d.manifest.read_text().replace("port: " + str(pa), "port: x"))
        r = d.cli("reload", "-f", str(d.manifest))
        assert r.returncode != 0
        assert "models.a.port: must be an integer" in r.stderr
        assert {n: x["pid"] for n, x in d.status().items()} == {
            n: x["pid"] for n, x in rows.items()
        }


def test_daemon_killed_then_up_again_adopts_every_server_unchanged(tmp_path: Path) -> None:
    """Live restore: the servers outlive a SIGKILLed daemon, and the next one adopts
    them (same processes, READY, no restart counted), with no duplicate."""
    models = f"""\
    m: {{backend: vllm, model: org/m, port: {free_port()}, gpus: [0, 1]}}
    o: {{backend: ollama, model: "qwen2.5:0.5b", port: {free_port()}}}
    """
    d = Daemon(tmp_path, models)
    try:
        d.start()
        before = d.wait_all_ready()
        old = [p.pid for p in full_tree(d, "m", 5)] + [p.pid for p in tree(server_pid(d, "o"))]
        assert len(old) >= 7
        d.kill_daemon()
        d.start()
        rows = d.wait_all_ready()
        assert not gone(old), "a server was stopped instead of adopted"
        assert {n: r["pid"] for n, r in rows.items()} == {n: r["pid"] for n, r in before.items()}
        assert [r["restarts"] for r in rows.values()] == [0, 0]
        assert sorted(p.pid for p in full_tree(d, "m", 5)) == sorted(old[:5])
        servers = [p for p in d.processes("o") if "runner" not in " ".join(p.cmdline())]
        assert len(servers) == 1
        assert "adopted pid" in (tmp_path / "state" / "logs" / "m.log").read_text()
    finally:
        d.stop()


def test_foreign_process_on_the_port_fails_without_a_loop(tmp_path: Path) -> None:
    port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        # A second model that launches keeps the daemon going (with none, it exits).
        models = f"""\
        m: {{backend: vllm, model: org/m, port: {port}, gpu_memory_utilization: 0.4}}
        ok: {{backend: vllm, model: org/ok, port: {free_port()}, gpu_memory_utilization: 0.4}}
        """
        with running(tmp_path, models) as d:
            row = d.wait_state("m", "FAILED")
            assert f"port {port} on 127.0.0.1 is held by pid {os.getpid()}" in row["reason"]
            assert row["restarts"] == 0
            assert d.processes("m") == []
    finally:
        holder.close()


def test_missing_executable_names_the_path(tmp_path: Path) -> None:
    port = free_port()
    # A second model that launches (by its absolute path) keeps the daemon going.
    models = f"""\
    m: {{backend: vllm, model: org/m, port: {free_port()}}}
    ok: {{backend: command, command: [{sys.executable}, -m, http.server, "{port}"], port: {port}}}
    """
    d = Daemon(tmp_path, models, extra_env={"PATH": "/nonexistent/bin"})
    d.env["PATH"] = "/nonexistent/bin"
    try:
        d.start()
        row = d.wait_state("m", "FAILED")
        assert "vllm: not found on PATH (searched: /nonexistent/bin)" in row["reason"]
    finally:
        d.stop()


def test_stop_and_start_one_model(tmp_path: Path) -> None:
    models = f"""\
    a: {{backend: vllm, model: org/a, port: {free_port()}, gpus: [0]}}
    b: {{backend: vllm, model: org/b, port: {free_port()}, gpus: [1]}}
    """
    with running(tmp_path, models) as d:
        d.wait_all_ready()
        a_tree = [p.pid for p in full_tree(d, "a", 4)]
        r = d.cli("stop", "-f", str(d.manifest), "a")
        assert r.returncode == 0, r.stderr
        assert "a: STOPPED" in r.stdout
        assert gone(a_tree)  # `stop` returns only once none of its processes remain
        assert d.state_of("b") == "READY"
        d.cli("start", "-f", str(d.manifest), "a")
        d.wait_state("a", "READY")


def test_logs_show_the_servers_output(tmp_path: Path) -> None:
    models = f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n"
    with running(tmp_path, models) as d:
        d.wait_all_ready()
        r = d.cli("logs", "--file", str(d.manifest), "m", "-n", "200")
        assert r.returncode == 0, r.stderr
        assert "Starting vLLM server on" in r.stdout


def test_invalid_manifest_starts_nothing(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "m: {backend: vllm, model: x, port: 0}\n")
    r = d.cli("up", "-d", "-f", str(d.manifest))
    assert r.returncode == 2
    assert "models.m.port" in r.stderr
    assert not d.sock.exists()
    assert d.processes() == []


def test_no_daemon_exits_3(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "m: {backend: vllm, model: x}\n")
    for args in (["status"], ["down"], ["restart", "m"], ["reload"]):
        r = d.cli(*args[:1], "-f", str(d.manifest), *args[1:])
        assert r.returncode == 3, (args, r.stderr)
        assert "no llmsup daemon is running" in r.stderr
        assert "llmsup up" in r.stderr


def test_detached_up_returns_once_the_daemon_answers(tmp_path: Path) -> None:
    models = f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n"
    d = Daemon(tmp_path, models)
    try:
        r = d.cli("up", "-d", "-f", str(d.manifest))
        assert r.returncode == 0, r.stderr
        assert d.answers()
        d.wait_all_ready()
        # `up` again hands the manifest to the running daemon
        r = d.cli("up", "-d", "-f", str(d.manifest))
        assert r.returncode == 0 and "unchanged: m" in r.stdout
        r = d.cli("down", "-f", str(d.manifest))
        assert r.returncode == 0
        assert d.processes() == []
    finally:
        d.stop()


def test_control_socket_is_private(tmp_path: Path) -> None:
    models = f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n"
    with running(tmp_path, models) as d:
        assert d.sock.stat().st_mode & 0o777 == 0o600


def test_up_with_a_running_daemon_hands_it_the_manifest(tmp_path: Path) -> None:
    models = f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n"
    with running(tmp_path, models) as d:
        r = d.cli("up", "-f", str(d.manifest))
        assert r.returncode == 0, r.stderr
        assert "unchanged: m" in r.stdout
        r = d.cli("up", "--foreground", "-f", str(d.manifest))
        assert r.returncode == 1
        assert "a daemon already answers" in r.stderr


def test_control_group_opens_the_socket_to_that_group(tmp_path: Path) -> None:
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    models = f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n"
    d = Daemon(tmp_path, models)
    d.manifest.write_text(f"control: {{group: {group}}}\n" + d.manifest.read_text())
    try:
        d.start()
        st = d.sock.stat()
        assert st.st_mode & 0o777 == 0o660
        assert st.st_gid == grp.getgrnam(group).gr_gid
        assert d.state.stat().st_mode & 0o777 == 0o750
    finally:
        d.stop()


def test_unknown_control_group_is_a_manifest_error(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "m: {backend: vllm, model: org/m}\n")
    d.manifest.write_text("control: {group: no-such-group-x}\n" + d.manifest.read_text())
    r = d.cli("check", "-f", str(d.manifest))
    assert r.returncode == 2
    assert "1:18: control.group: no such group 'no-such-group-x'" in r.stderr


def test_models_sharing_a_gpu_start_one_after_another(tmp_path: Path) -> None:
    models = f"""\
    first:
      backend: vllm
      model: org/a
      port: {free_port()}
      gpus: [0]
      gpu_memory_utilization: 0.45
      env: {{FAKE_LOAD_TIME: "1.5"}}
    second: {{backend: vllm, model: org/b, port: {free_port()}, gpus: [0],
             gpu_memory_utilization: 0.45}}
    """
    with running(tmp_path, models) as d:
        rows = d.status()
        assert rows["first"]["state"] in ("STARTING", "LOADING")
        assert rows["second"]["state"] == "WAITING"
        assert rows["second"]["pid"] is None
        assert "after first" in rows["second"]["detail"]
        ready = d.wait_state("first", "READY")
        rows = d.wait_all_ready()
        second = psutil.Process(rows["second"]["pid"])
        first = psutil.Process(ready["pid"])
        assert second.create_time() >= first.create_time() + 1.0


def test_sighup_reloads_the_manifest(tmp_path: Path) -> None:
    pa, pb = free_port(), free_port()
    base = f"""\
    a: {{backend: vllm, model: org/a, port: {pa}, gpus: [0]}}
    b: {{backend: vllm, model: org/b, port: {pb}, gpus: [1]}}
    """
    with running(tmp_path, base) as d:
        before = {n: r["pid"] for n, r in d.wait_all_ready().items()}
        d.write(base.replace("org/a", "org/a2"))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.status()["a"]["pid"] not in (None, before["a"]), 10)
        rows = d.wait_all_ready()
        assert rows["b"]["pid"] == before["b"]


def test_two_reloads_at_once_leave_one_server(tmp_path: Path) -> None:
    """SIGHUP (systemd's ExecReload) and `llmsup reload` at the same moment: the
    changed model ends with one supervised server, not two fighting for its port."""
    port = free_port()
    base = f"a: {{backend: vllm, model: org/a, port: {port}, gpus: [0]}}\n"
    with running(tmp_path, base) as d:
        old = d.wait_all_ready()["a"]["instance"]
        d.write(base.replace("org/a", "org/a2"))
        assert d.proc is not None
        answers: list[tuple[int, Any]] = []
        body = {"manifest": str(d.manifest)}
        sock = threading.Thread(
            target=lambda: answers.append(call(d.sock, "POST", "/v1/reload", body))
        )
        sock.start()
        d.proc.send_signal(signal.SIGHUP)
        sock.join(30)
        assert answers and answers[0][0] == 200
        wait_for(lambda: d.status()["a"]["instance"] not in (None, old), 15)
        d.wait_state("a", "READY")
        instances: set[str | None] = set()
        log = Path(d.status()["a"]["log"])
        probes = log.read_text(errors="replace").count('"GET /health')

        def ten_more_probes() -> bool:  # it stays READY, with one instance, meanwhile
            instances.update(d.instances("a"))
            instances.add(d.status()["a"]["instance"])
            return log.read_text(errors="replace").count('"GET /health') >= probes + 10

        wait_for(ten_more_probes, 30, interval=0.1)
        assert len(instances) == 1, instances
        assert d.state_of("a") == "READY"


def test_leftover_of_our_own_on_the_port_is_stopped_not_reported(tmp_path: Path) -> None:
    from llmsup.process import MARKER, state_key

    port = free_port()
    with running(tmp_path, f"m: {{backend: vllm, model: org/m, port: {port}}}\n") as d:
        d.wait_all_ready()
        assert d.cli("stop", "-f", str(d.manifest), "m").returncode == 0
        # an instance of m that a cut-short stop would have left behind
        env = {**d.env, MARKER: f"{state_key(d.state)}:m:stale0000000", "FAKE_LOAD_TIME": "0"}
        stale = subprocess.Popen(
            ["vllm", "serve", "org/m", "--port", str(port), "--host", "127.0.0.1"],
            env=env,
            start_new_session=True,
        )
        try:
            wait_for(lambda: stale.poll() is None and _listening(port), 10)
            assert d.cli("start", "-f", str(d.manifest), "m").returncode == 0
            row = d.wait_state("m", "READY")
            assert row["pid"] != stale.pid
            assert stale.wait(10) is not None
        finally:
            if stale.poll() is None:
                stale.kill()
                stale.wait()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_loading_is_shown_from_the_log_while_the_port_is_closed(tmp_path: Path) -> None:
    port = free_port()
    models = f"""\
    m:
      backend: vllm
      model: org/m
      port: {port}
      env: {{FAKE_LOAD_TIME: "60"}}
    """
    with running(tmp_path, models) as d:
        row = d.wait_state("m", "LOADING")
        assert row["progress"] == "loading weights (10%)", row
        assert not _listening(port)  # real vLLM refuses connections while it loads


def test_restart_asked_for_stops_the_server_and_starts_it_afresh(tmp_path: Path) -> None:
    models = f"""\
    m: {{backend: vllm, model: org/m, port: {free_port()}}}
    """
    with running(tmp_path, models) as d:
        d.wait_all_ready()
        old = [p.pid for p in tree(server_pid(d, "m"))]
        r = d.cli("restart", "-f", str(d.manifest), "m")
        assert r.returncode == 0, r.stderr
        # It returns once the old server is gone and the new start is under way.
        assert r.stdout.strip() == "m: STARTING"
        assert gone(old)
        row = d.wait_state("m", "READY")
        assert row["pid"] not in old and row["restarts"] == 0
        r = d.cli("logs", "--file", str(d.manifest), "m", "-n", "500")
        ours = [line for line in r.stdout.splitlines() if line.startswith("--- llmsup ")]
        assert any(line.endswith("restarting (requested)") for line in ours), ours
        assert not any("stopped" in line for line in ours), ours


def test_restart_causes_are_in_the_logs(tmp_path: Path) -> None:
    models = f"""\
    m: {{backend: vllm, model: org/m, port: {free_port()}}}
    """
    with running(tmp_path, models) as d:
        d.wait_all_ready()
        os.kill(server_pid(d, "m"), signal.SIGKILL)
        wait_for(lambda: d.status()["m"]["restarts"] == 1, 10)
        d.wait_state("m", "READY")
        r = d.cli("logs", "--file", str(d.manifest), "m", "-n", "500")
        assert r.returncode == 0, r.stderr
        ours = [line for line in r.stdout.splitlines() if line.startswith("--- llmsup ")]
        causes = [line for line in ours if "killed by SIGKILL; restart 1/3 in " in line]
        assert len(causes) == 1, ours
        # a timestamp, then the cause and the delay
        stamp = causes[0].split()[2].rstrip(":")
        assert datetime.datetime.fromisoformat(stamp).tzinfo is not None, causes[0]
        assert re.search(r"restart 1/3 in \d+\.\ds$", causes[0]), causes[0]
        assert sum("ready after" in line for line in ours) == 2
        # The daemon's own log says the same.
        assert re.search(r"m: killed by SIGKILL; restart 1/3 in \d+\.\ds", d.log()), d.log()
        r = d.cli("stop", "-f", str(d.manifest), "m")
        assert r.returncode == 0, r.stderr
        tail = d.cli("logs", "--file", str(d.manifest), "m", "-n", "5").stdout
        assert "stopped (requested)" in tail
