"""The gateway runs in a process of its own, started by the daemon on sockets the daemon
bound: killed, it comes back on the same port without touching the models; it never
outlives the daemon; a reload that changes its settings keeps its port."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import psutil
import pytest

from llmsup import limits
from llmsup.client import call
from llmsup.gateway.host import Settings
from llmsup.manifest import parse_manifest
from tests.supervisor_util import Daemon
from tests.test_gateway_daemon import chat, post
from tests.util import free_port, wait_for


def gateway_of(d: Daemon) -> dict[str, Any]:
    _, data = call(d.sock, "GET", "/v1/status")
    info: dict[str, Any] = data["gateway"]
    return info


def one_model(tmp_path: Path, gw: int, key: str = "gw-key") -> Daemon:
    d = Daemon(
        tmp_path, f"m: {{backend: vllm, model: org/m, served_name: m, port: {free_port()}}}\n"
    )
    d.manifest.write_text(f"gateway: {{port: {gw}, api_keys: [{key}]}}\n" + d.manifest.read_text())
    return d


def test_a_killed_gateway_comes_back_on_its_port_and_the_model_keeps_running(
    tmp_path: Path,
) -> None:
    gw = free_port()
    d = one_model(tmp_path, gw)
    try:
        d.start()
        first = d.wait_state("m", "READY")
        info = gateway_of(d)
        assert info["listening"] and info["pid"] is not None
        worker = psutil.Process(info["pid"])
        assert d.proc is not None and worker.ppid() == d.proc.pid
        assert post(gw, chat("m"))[0] == 200

        os.kill(worker.pid, signal.SIGKILL)
        # The daemon still holds the listening socket: a client connects meanwhile
        # (it waits in the backlog) and is answered once the new gateway runs.
        with socket.create_connection(("127.0.0.1", gw), timeout=5):
            pass
        code, body, _ = post(gw, chat("m"))
        assert code == 200, body

        def replaced() -> dict[str, Any] | None:
            g = gateway_of(d)
            return g if g["pid"] not in (None, worker.pid) else None

        assert wait_for(replaced, 20)["listening"]
        row = d.wait_state("m", "READY")
        assert (row["pid"], row["restarts"]) == (first["pid"], 0)  # the model never noticed
        assert "the gateway process exited (signal SIGKILL)" in d.log()
    finally:
        d.stop()
    assert d.leftovers == []


def test_the_gateway_does_not_outlive_a_killed_daemon(tmp_path: Path) -> None:
    gw = free_port()
    d = one_model(tmp_path, gw)
    try:
        d.start()
        d.wait_state("m", "READY")
        worker = psutil.Process(gateway_of(d)["pid"])
        d.kill_daemon()
        # Its channel closed: it stops listening and exits by itself.
        wait_for(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, 15)
        # The next daemon gets the port (and stops the model the killed one left).
        d.start()
        d.wait_state("m", "READY")
        assert gateway_of(d)["listening"]
        assert post(gw, chat("m"))[0] == 200
    finally:
        d.stop()


def test_a_reload_that_changes_the_gateway_keeps_its_port(tmp_path: Path) -> None:
    gw = free_port()
    d = one_model(tmp_path, gw, key="old-key")
    try:
        d.start()
        first = d.wait_state("m", "READY")
        before = gateway_of(d)["pid"]
        assert post(gw, chat("m"), key="old-key")[0] == 200
        d.manifest.write_text(d.manifest.read_text().replace("old-key", "new-key"))
        r = d.cli("reload", "-f", str(d.manifest))
        assert r.returncode == 0, r.stderr
        wait_for(lambda: gateway_of(d)["pid"] not in (None, before), 20)
        assert post(gw, chat("m"), key="new-key")[0] == 200
        assert post(gw, chat("m"), key="old-key")[0] == 401
        assert d.wait_state("m", "READY")["pid"] == first["pid"]  # the model kept running
    finally:
        d.stop()


def test_settings_read_the_key_file_and_cap_connections_by_the_open_files_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k2\n\nk3\n")
    text = (
        f"gateway: {{port: 8000, api_keys: [k1], api_key_file: {keys}, max_connections: 500,"
        " aliases: {gpt: m}}\nmodels:\n  m: {backend: vllm, model: org/m}\n"
    )
    manifest = parse_manifest(text, "m.yaml", {}).manifest
    settings = Settings.of(manifest)
    assert settings is not None
    assert (settings.host, settings.port, settings.keys) == ("127.0.0.1", 8000, ("k1", "k2", "k3"))
    monkeypatch.setattr(limits, "open_files_limit", lambda: 1024)
    config = settings.config(servers=2)  # (1024 - 128 - 2 * 4) // 2 = 444 connections
    assert config.max_connections == 444
    assert (config.api_keys, dict(config.aliases)) == (("k1", "k2", "k3"), {"gpt": "m"})
    assert "gateway.max_connections 500 is more than the open files limit (1024)" in caplog.text
    no_gateway = parse_manifest("models:\n  m: {backend: vllm, model: org/m}\n", "m.yaml", {})
    assert Settings.of(no_gateway.manifest) is None


def test_a_reload_that_removes_a_model_leaves_the_gateway_process_alone(tmp_path: Path) -> None:
    """While a removed model stops, its server is still the daemon's but no longer in the
    manifest: what the daemon sends the gateway then must not fail (it used to, and the
    gateway lost every later change, or, once that was caught, was restarted mid-stream)."""
    gw = free_port()
    keep = f"m: {{backend: vllm, model: org/m, served_name: m, port: {free_port()}}}\n"
    extra = f"x: {{backend: vllm, model: org/x, served_name: x, port: {free_port()}, gpus: [1]}}\n"
    d = Daemon(tmp_path, keep + extra)
    d.manifest.write_text(f"gateway: {{port: {gw}, api_keys: [gw-key]}}\n" + d.manifest.read_text())
    try:
        d.start()
        d.wait_state("m", "READY")
        d.wait_state("x", "READY")
        before = gateway_of(d)["pid"]
        d.manifest.write_text(d.manifest.read_text().replace(extra, ""))
        r = d.cli("reload", "-f", str(d.manifest))
        assert r.returncode == 0, r.stderr
        wait_for(lambda: "x" not in d.status(), 20)
        # The gateway sees the change (x gone: 404) in the same process as before.
        wait_for(lambda: post(gw, chat("x"))[0] == 404, 10)
        assert gateway_of(d)["pid"] == before
        assert post(gw, chat("m"))[0] == 200
        assert "channel failed" not in d.log() and "gateway process exited" not in d.log()
    finally:
        d.stop()


def test_a_reload_onto_a_taken_gateway_port_changes_nothing(tmp_path: Path) -> None:
    gw = free_port()
    d = one_model(tmp_path, gw)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        d.start()
        first = d.wait_state("m", "READY")
        before = gateway_of(d)["pid"]
        text = d.manifest.read_text()
        # Also a model change: the refusal must come before any model is touched.
        d.manifest.write_text(
            text.replace(f"port: {gw}", f"port: {taken}").replace("org/m", "org/m2")
        )
        r = d.cli("reload", "-f", str(d.manifest))
        assert r.returncode != 0
        assert f"the gateway cannot listen on 127.0.0.1:{taken}" in r.stderr
        assert gateway_of(d)["pid"] == before and gateway_of(d)["port"] == gw
        assert post(gw, chat("m"))[0] == 200
        row = d.wait_state("m", "READY")
        assert (row["pid"], row["restarts"]) == (first["pid"], 0)
    finally:
        holder.close()
        d.stop()
