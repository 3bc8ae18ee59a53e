"""The gateway inside the daemon: routing to supervised servers, on-demand, swaps."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

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
        time.sleep(0.2)
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
