"""The CLI's renderers: the data `--json` prints, as the text printed without it.
No daemon and no processes: each test feeds a dict shaped as the daemon answers."""

from __future__ import annotations

import textwrap
from typing import Any

from llmsup.cli import render
from llmsup.manifest import parse_manifest
from llmsup.plan import plan_or_raise


def row(name: str, state: str, **over: Any) -> dict[str, Any]:
    """A model's row as `GET /v1/status` gives it."""
    base: dict[str, Any] = {
        "name": name,
        "unit": name,
        "backend": "vllm",
        "state": state,
        "detail": "",
        "pid": None,
        "port": 8000,
        "uptime": None,
        "restarts": 0,
        "last_exit": None,
        "reason": "",
        "health_latency_ms": None,
        "progress": "",
        "tail": [],
        "gpu_memory": None,
    }
    return {**base, **over}


def cells(line: str) -> list[str]:
    return line.split()


def test_status_rows_ready_failed_stopped() -> None:
    data = {
        "models": [
            row(
                "llama",
                "READY",
                pid=4242,
                uptime=7325.0,
                detail="serving",
                restarts=1,
                health_latency_ms=3.4,
                gpu_memory={"1": 3 * 2**30, "0": 2**31},
                last_exit="exit 1",
            ),
            row(
                "qwen",
                "FAILED",
                port=8001,
                restarts=5,
                reason="5 restarts in 60s",
                detail="loading weights",
                last_exit="signal 9",
                tail=[f"line {i}" for i in range(15)],
            ),
            row("phi", "STOPPED", backend="ollama", port=11434, detail="stopped by request"),
        ],
        "gateway": None,
    }
    out = render.status(data)
    head, ready, failed, stopped = out[:4]
    assert cells(head) == [
        *("NAME", "BACKEND", "STATE", "PID", "PORT", "UPTIME", "RESTARTS"),
        *("HEALTH", "GPU", "MEM", "DETAIL"),
    ]
    # Columns line up: each row's STATE starts where the heading's does.
    states = ("STATE", "READY", "FAILED", "STOPPED")
    assert {line.index(s) for line, s in zip(out[:4], states, strict=True)} == {head.index("STATE")}
    assert cells(ready) == [
        *("llama", "vllm", "READY", "4242", "8000", "2h02m", "1", "3ms"),
        *("0:2.0G", "1:3.0G", "serving", "(last:", "exit", "1)"),
    ]
    # FAILED says why (not the load step it reached) and not the last exit.
    assert cells(failed) == [
        *("qwen", "vllm", "FAILED", "-", "8001", "-", "5", "-", "n/a"),
        *("5", "restarts", "in", "60s"),
    ]
    assert cells(stopped) == [
        *("phi", "ollama", "STOPPED", "-", "11434", "-", "0", "-", "n/a"),
        *("stopped", "by", "request"),
    ]
    # A FAILED model's last ten log lines follow the table; no gateway line.
    assert out[4:] == ["\nqwen: last log lines:", *[f"  line {i}" for i in range(5, 15)]]


def test_status_gateway_line_and_gpu_note() -> None:
    gateway = {
        "host": "0.0.0.0",
        "port": 9000,
        "url": "http://127.0.0.1:9000/v1",
        "keys_required": False,
        "listening": True,
    }
    data = {
        "models": [row("a", "READY", gpu_memory={})],
        "gateway": gateway,
        "gpu_note": "NVIDIA driver stopped answering",
    }
    out = render.status(data)
    assert cells(out[1])[8] == "-"  # GPUs known, none held
    assert out[2:] == [
        "note: NVIDIA driver stopped answering",
        "gateway: http://127.0.0.1:9000/v1 (listening on 0.0.0.0:9000), "
        "no API key: open to anyone who reaches it",
    ]
    keyed = render.gateway_line({**gateway, "keys_required": True})
    assert keyed is not None and keyed.endswith("API key required")
    assert render.gateway_line({**gateway, "listening": False}) == (
        "gateway: not listening on 0.0.0.0:9000"
    )
    # Without GPU information on any row the note is not shown.
    assert not any(
        line.startswith("note:") for line in render.status({**data, "models": [row("a", "READY")]})
    )


def test_status_says_when_a_log_drops_output() -> None:
    warning = "/var/lib/llmsup/logs/a.log: disk full (No space left on device): dropping output"
    data = {
        "models": [
            row("a", "READY", unit="a", log_dropped_bytes=3 * 2**20 // 2, log_warning=warning),
            row("a2", "READY", unit="a", log_dropped_bytes=3 * 2**20 // 2, log_warning=warning),
            row("b", "READY", log_dropped_bytes=512, log_warning=""),
            row("c", "READY", log_dropped_bytes=0, log_warning=""),
            row("d", "READY"),  # a daemon that predates the fields
        ],
        "gateway": None,
    }
    out = render.status(data)
    # The rows are unchanged (the server's state is not the log's); the lines follow,
    # one per server however many models it serves.
    assert [cells(line)[2] for line in out[1:6]] == ["READY"] * 5
    assert out[6:] == [
        f"warning: a: {warning} (1.5 MiB dropped so far)",
        "note: b: 512 B of output could not be written to its log",
    ]


def test_size() -> None:
    assert [render.size(n) for n in (0, 1023, 1024, 1536, 5 * 2**30, 5 * 2**40)] == [
        *("0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 GiB", "5120.0 GiB"),
    ]


def test_age() -> None:
    assert [render.age(s) for s in (None, 0, 119.9, 120, 7199, 7200, 90061)] == [
        *("-", "0s", "119s", "2m", "119m", "2h00m", "25h01m"),
    ]


def test_leftovers_and_reload() -> None:
    out = render.leftovers(
        [
            {"unit": "a", "pid": 10, "alive": [10, 11], "argv": ["vllm", "serve", "m x"]},
            {"unit": "b", "pid": 20, "alive": [], "argv": ["ollama", "serve"]},
        ]
    )
    assert [cells(line)[:4] for line in out] == [
        ["UNIT", "PID", "STATE", "ALIVE"],
        ["a", "10", "unsupervised", "10"],
        ["b", "20", "gone", "none"],
    ]
    assert out[1].endswith("vllm serve 'm x'")
    result = {"added": ["c"], "removed": [], "restarted": ["a", "b"], "unchanged": ["d"]}
    assert render.reload(result) == ["added: c", "restarted: a, b", "unchanged: d"]


def test_plan_text_from_the_plans_json() -> None:
    loaded = parse_manifest(
        textwrap.dedent(
            """
            models:
              llama:
                backend: vllm
                model: meta-llama/Llama-3.1-8B-Instruct
                gpus: [0]
                port: 8001
                env: {HF_HOME: /srv/hf cache}
              qwen:
                backend: ollama
                model: qwen2.5:7b
                gpus: [1]
              phi:
                backend: ollama
                model: phi3:mini
                gpus: [1]
            """
        ),
        "models.yaml",
        {},
    )
    entries = plan_or_raise(loaded).to_json()
    text = "\n".join(render.plan(entries, ("0.32", "the installed vLLM")))
    assert text.startswith("# vLLM flags checked against 0.32's: the installed vLLM\n\n")
    llama = next(e for e in entries if e["name"] == "llama")
    # Each server: a heading, its environment (quoted) before its exact command line.
    assert "# 1. llama (vllm) on 127.0.0.1:8001\n" in text
    assert "HF_HOME='/srv/hf cache'" in text
    assert f" \\\n  {' '.join(llama['argv'])}\n" in text
    # Two models of one Ollama server: the second names the server, no second command.
    unit = next(e["unit"] for e in entries if e["name"] == "phi")
    later = max(i for i, e in enumerate(entries, 1) if e["unit"] == unit)
    later_name = entries[later - 1]["name"]
    assert f"# {later}. {later_name} (ollama): served by {unit}'s server\n" in text
    assert text.count("ollama serve") == 1
    # Without a vLLM entry there is no flags heading.
    ollama_only = [e for e in entries if e["backend"] == "ollama"]
    assert not render.plan(ollama_only, ("0.32", "why"))[0].startswith("# vLLM")
    assert render.plan([], None) == []


def test_gpus_text_puts_each_process_under_its_gpu() -> None:
    gib = 2**30
    gpu = {"name": "H100", "memory_total": 80 * gib, "utilization": None, "temperature": None}
    data = {
        "gpus": [
            {**gpu, "index": 0, "uuid": "GPU-a", "memory_used": 40 * gib, "memory_free": 40 * gib},
            {**gpu, "index": 1, "uuid": "GPU-b", "memory_used": 0, "memory_free": 80 * gib},
        ],
        "processes": [
            {"gpu": 0, "pid": 77, "used_memory": 40 * gib, "owner": "orphan of m"}
            | {"user": "root", "command": "python -m vllm.entrypoints"},
            {"gpu": 1, "pid": 78, "used_memory": None, "owner": "foreign"}
            | {"user": None, "command": None},
        ],
        "notes": ["GPU 2 skipped: lost"],
    }
    out = render.gpus(data)
    assert out[0] == "GPU 0  H100  40.0 GiB / 80.0 GiB used, 40.0 GiB free  util -  -  GPU-a"
    assert cells(out[1]) == [
        *("pid", "77", "40.0", "GiB", "orphan", "of", "m"),
        *("root:", "python", "-m", "vllm.entrypoints"),
    ]
    assert out[2].startswith("GPU 1  H100  0 B / 80.0 GiB used")
    assert cells(out[3]) == ["pid", "78", "?", "foreign", "not", "visible", "to", "this", "user"]
    assert out[4:] == ["note: GPU 2 skipped: lost"]


def test_settled_once_no_server_is_on_its_way_up() -> None:
    assert render.settled({}, 1.0) is None
    for busy in ("WAITING", "WAITING_GPU", "STARTING", "LOADING", "BACKOFF"):
        assert render.settled({"a": "READY", "b": busy}, 1.0) is None
    assert render.settled({"a": "READY", "b": "FAILED", "c": "STOPPED"}, 3.14) == (
        "1 ready, 1 failed, after 3.1s; supervising (Ctrl-C stops all)"
    )
    # Nothing launched: the daemon exits saying why, so it does not claim to supervise.
    assert render.settled({"a": "FAILED", "b": "FAILED"}, 0.5) == "0 ready, 2 failed, after 0.5s"
