"""The gateway inside the daemon: routing to supervised servers, on-demand, swaps."""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import socket
import urllib.error
import urllib.request
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from llmsup.client import call
from tests.supervisor_util import Daemon
from tests.util import free_port, wait_for


def post(
    port: int, body: dict[str, Any], key: str = "gw-key", timeout: float = 30
) -> tuple[int, Any, dict[str, str]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def get(port: int, path: str, key: str = "gw-key") -> tuple[int, str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def models() -> str:
    return f"""\
    always: {{backend: vllm, model: org/always, served_name: always, port: {free_port()},
              gpus: [0], gpu_memory_utilization: 0.3, api_key: upstream-key}}
    big1: {{backend: vllm, model: org/big1, served_name: big1, port: {free_port()}, gpus: [1],
            gpu_memory_utilization: 0.6, start: on_demand, idle_timeout: 1s}}
    big2: {{backend: vllm, model: org/big2, served_name: big2, port: {free_port()}, gpus: [1],
            gpu_memory_utilization: 0.6, start: on_demand}}
    """


def test_gateway_routes_starts_on_demand_swaps_and_idles(tmp_path: Path) -> None:
    gw = free_port()
    d = Daemon(tmp_path, models())
    d.manifest.write_text(
        f"gateway: {{port: {gw}, api_keys: [gw-key], aliases: {{gpt-4o: always}}}}\n"
        + d.manifest.read_text()
    )
    try:
        d.start()
        d.wait_state("always", "READY")
        assert d.status()["big1"]["state"] == "STOPPED"  # on-demand: not started by `up`
        code, body, _ = post(gw, chat("always"))
        assert code == 200, body
        code, body, _ = post(gw, chat("gpt-4o"))  # alias; upstream key added by llmsup
        assert code == 200, body
        code, body, _ = post(gw, chat("always"), key="wrong")
        assert code == 401
        code, body, _ = post(gw, chat("nope"))
        assert code == 404 and "always" in body["error"]["message"]
        # on-demand start: the first request waits until the model is READY
        code, body, _ = post(gw, chat("big1"))
        assert code == 200, body
        assert d.status()["big1"]["state"] == "READY"
        # big2 cannot share GPU 1 with big1: the request swaps them
        code, body, _ = post(gw, chat("big2"))
        assert code == 200, body
        rows = d.status()
        assert rows["big2"]["state"] == "READY"
        assert rows["big1"]["state"] == "STOPPED"
        assert d.processes("big1") == []
        # /v1/models lists every model with its state, /metrics parses
        code, text = get(gw, "/v1/models")
        listed = {m["id"]: m["llmsup"]["state"] for m in json.loads(text)["data"]}
        assert listed["big1"] == "STOPPED" and listed["big2"] == "READY"
        code, text = get(gw, "/metrics")
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        ready = {s.labels["model"]: s.value for s in families["llmsup_model_ready"].samples}
        assert ready["big2"] == 1.0 and ready["big1"] == 0.0
        # big1 again, then idle: stopped after its idle_timeout of 1s
        assert post(gw, chat("big1"))[0] == 200
        wait_for(lambda: d.status()["big1"]["state"] == "STOPPED", 10)
        assert d.processes("big1") == []
    finally:
        d.stop()


def test_failed_model_gets_503_with_the_reason(tmp_path: Path) -> None:
    gw = free_port()
    text = f"""\
    broken: {{backend: vllm, model: org/x, served_name: broken, port: {free_port()},
              restart: {{policy: never}}, env: {{FAKE_EXIT_CODE: "4", FAKE_EXIT_AFTER: "0"}}}}
    """
    d = Daemon(tmp_path, text)
    d.manifest.write_text(f"gateway: {{port: {gw}}}\n" + d.manifest.read_text())
    try:
        d.start()
        d.wait_state("broken", "FAILED")
        code, body, _ = post(gw, chat("broken"))
        assert code == 503
        assert "exited with code 4" in body["error"]["message"]
    finally:
        d.stop()


def test_stopped_model_gets_503_for_an_api_client(tmp_path: Path) -> None:
    gw = free_port()
    d = Daemon(
        tmp_path, f"m: {{backend: vllm, model: org/m, served_name: m, port: {free_port()}}}\n"
    )
    d.manifest.write_text(f"gateway: {{port: {gw}}}\n" + d.manifest.read_text())
    try:
        d.start()
        d.wait_state("m", "READY")
        assert d.cli("stop", "-f", str(d.manifest), "m").returncode == 0
        code, body, headers = post(gw, chat("m"))
        assert code == 503 and "Retry-After" not in headers  # retrying cannot help
        err = body["error"]
        assert err["code"] == "model_stopped" and err["type"] == "server_error"
        assert err["message"] == "Model `m` is stopped and is not accepting requests"
    finally:
        d.stop()


def test_gateway_port_taken_starts_nothing(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    gw = holder.getsockname()[1]
    try:
        d = Daemon(tmp_path, f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n")
        d.manifest.write_text(f"gateway: {{port: {gw}}}\n" + d.manifest.read_text())
        r = d.cli("up", "--foreground", "-f", str(d.manifest), timeout=30)
        assert r.returncode == 1
        assert f"the gateway cannot listen on 127.0.0.1:{gw}" in r.stderr
        assert d.processes() == []
    finally:
        holder.close()


def test_exclusive_group_swaps_models_on_different_gpus(tmp_path: Path) -> None:
    gw = free_port()
    text = f"""\
    chat-a: {{backend: vllm, model: org/a, served_name: chat-a, port: {free_port()}, gpus: [0],
              start: on_demand, exclusive: chat}}
    chat-b: {{backend: vllm, model: org/b, served_name: chat-b, port: {free_port()}, gpus: [1],
              start: on_demand, exclusive: chat}}
    """
    d = Daemon(tmp_path, text)
    d.manifest.write_text(f"gateway: {{port: {gw}}}\n" + d.manifest.read_text())
    try:
        d.start()
        assert post(gw, chat("chat-a"))[0] == 200
        a_tree = [p.pid for p in d.processes("chat-a")]
        assert post(gw, chat("chat-b"))[0] == 200
        rows = d.status()
        assert (rows["chat-a"]["state"], rows["chat-b"]["state"]) == ("STOPPED", "READY")
        assert d.processes("chat-a") == [] and a_tree
    finally:
        d.stop()


def test_idle_stop_still_works_after_a_reload_adds_a_model(tmp_path: Path) -> None:
    gw = free_port()
    od = f"""\
    od: {{backend: vllm, model: org/od, served_name: od, port: {free_port()}, gpus: [1],
          start: on_demand, idle_timeout: 1s}}
    """
    d = Daemon(tmp_path, od)
    head = f"gateway: {{port: {gw}}}\n"
    d.manifest.write_text(head + d.manifest.read_text())
    try:
        d.start()
        d.write(od + f"extra: {{backend: vllm, model: org/x, port: {free_port()}, gpus: [2]}}\n")
        d.manifest.write_text(head + d.manifest.read_text())
        assert d.cli("reload", "-f", str(d.manifest)).returncode == 0
        d.wait_state("extra", "READY")
        assert post(gw, chat("od"))[0] == 200
        wait_for(lambda: d.status()["od"]["state"] == "STOPPED", 10)
    finally:
        d.stop()


# ------------------------------------------------------------------ a flood of connections

HALF_REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le"


class Flood:
    """Connections that send half a request and wait, as anyone who can reach the
    gateway's port may open; what each received before the gateway closed it."""

    def __init__(self, port: int, n: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.received: dict[int, bytes] = {}
        self.closed: dict[int, bytes] = {}
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(HALF_REQUEST)
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, i)
            self.received[i] = b""

    def poll(self) -> int:
        """Read what arrived; returns how many connections the gateway has closed."""
        for key, _ in self.sel.select(0):
            sock, i = key.fileobj, key.data
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except OSError:  # reset: closed with our half request unread
                data = b""
            if data:
                self.received[i] += data
                continue
            self.sel.unregister(sock)
            sock.close()
            self.closed[i] = self.received[i]
        return len(self.closed)

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            assert isinstance(key.fileobj, socket.socket)
            key.fileobj.close()
        self.sel.close()


def test_a_flood_of_idle_connections_leaves_supervision_running(tmp_path: Path) -> None:
    """With 256 descriptors, 300 half-sent requests used to take them all: a killed
    server was not respawned, status got no answer, the requests were held for ever."""
    gw = free_port()
    d = Daemon(
        tmp_path, f"a: {{backend: vllm, model: org/a, served_name: a, port: {free_port()}}}\n"
    )
    d.manifest.write_text(
        f"gateway: {{port: {gw}, api_keys: [gw-key], header_timeout: 5s}}\n"
        + d.manifest.read_text()
    )
    d.preexec = partial(resource.setrlimit, resource.RLIMIT_NOFILE, (256, 256))
    flood: Flood | None = None
    try:
        d.start()
        first = d.wait_state("a", "READY")
        assert d.proc is not None
        daemon = psutil.Process(d.proc.pid)
        assert daemon.rlimit(resource.RLIMIT_NOFILE) == (256, 256)
        _, raw = call(d.sock, "GET", "/v1/status")
        gateway = psutil.Process(raw["gateway"]["pid"])  # the gateway's own process
        assert gateway.ppid() == daemon.pid and gateway.rlimit(resource.RLIMIT_NOFILE) == (256, 256)
        # Counted once it has served (its loop, its pooled upstream connection): it
        # starts on its own, after the daemon answers.
        assert post(gw, chat("a"))[0] == 200
        daemon_fds, before = daemon.num_fds(), gateway.num_fds()
        flood = Flood(gw, 300)
        wait_for(lambda: gateway.num_fds() >= before + 50, 30, message="the flood never arrived")
        assert daemon.num_fds() < daemon_fds + 5  # the flood is the gateway's, not the daemon's

        os.kill(first["pid"], signal.SIGKILL)  # while the flood holds its connections

        def respawned() -> dict[str, Any] | None:
            row = d.status()["a"]
            return row if row["state"] == "READY" and row["pid"] != first["pid"] else None

        wait_for(respawned, 30, message=f"not respawned: {d.log()[-2000:]}")
        r = d.cli("status", "-f", str(d.manifest), timeout=30)
        assert r.returncode == 0 and "READY" in r.stdout, r.stderr

        # Those over the cap got 503 at once; the others 408 after header_timeout.
        wait_for(lambda: flood is not None and flood.poll() == 300, 60, message="held for ever")
        heads = Counter(answer.split(b"\r\n")[0] for answer in flood.closed.values())
        assert set(heads) <= {
            b"HTTP/1.1 503 Service Unavailable",
            b"HTTP/1.1 408 Request Timeout",
            b"",
        }
        assert heads[b"HTTP/1.1 408 Request Timeout"] >= 1, heads
        flood.close()
        flood = None

        row = d.wait_state("a", "READY")
        assert row["restarts"] == 1 and "FAILED" not in d.log()  # the kill, and nothing else
        assert post(gw, chat("a"))[0] == 200
        assert gateway.num_fds() < before + 10  # the gateway let go of them all
    finally:
        if flood is not None:
            flood.close()
        d.stop()


def test_the_daemon_raises_its_open_files_limit_to_the_hard_one(tmp_path: Path) -> None:
    d = Daemon(tmp_path, f"a: {{backend: vllm, model: org/a, port: {free_port()}}}\n")
    d.preexec = partial(resource.setrlimit, resource.RLIMIT_NOFILE, (300, 400))
    try:
        d.start()
        assert d.proc is not None
        assert psutil.Process(d.proc.pid).rlimit(resource.RLIMIT_NOFILE) == (400, 400)
    finally:
        d.stop()
