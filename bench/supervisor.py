"""Supervisor benchmarks: respawn latency, readiness lag, idle footprint.

    .venv/bin/python bench/supervisor.py [--kills 30] [--starts 20] [--models 32]
    .venv/bin/python bench/supervisor.py --only readiness   # one part; the others are kept
    .venv/bin/python bench/supervisor.py --only respawn

Runs real daemons against the fake servers and writes
bench/results/supervisor.json and .md. Figures are medians (and p90), each
next to a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import summary_ms  # noqa: E402
from tests.supervisor_util import Daemon  # noqa: E402
from tests.util import free_port, wait_for  # noqa: E402

RESULTS = ROOT / "bench" / "results"
STAMP = "date +%s.%N >> {file}; exec python3 -m http.server {port} --bind 127.0.0.1"


def last_stamp(file: Path, count: int) -> float | None:
    lines = file.read_text().split() if file.exists() else []
    return float(lines[-1]) if len(lines) >= count else None


# ------------------------------------------------------------ respawn latency


LOAD = """
import asyncio, json, sys, aiohttp
async def one(session, url, body, counts):
    while True:
        try:
            async with session.post(url, json=body) as r:
                async for _ in r.content.iter_any():
                    pass
                counts[r.status] = counts.get(r.status, 0) + 1
        except aiohttp.ClientError:
            counts["error"] = counts.get("error", 0) + 1
async def main(url, n):
    body = {"model": "chat", "stream": True, "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}]}
    counts = {}
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(one(session, url, body, counts)) for _ in range(n)]
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def respawn_llmsup(tmp: Path, kills: int, load: int = 0) -> tuple[list[float], float]:
    """SIGKILL a server; time until its replacement process runs (backoff 0).

    With `load`, that many clients stream completions through the gateway (to
    another model) all along: supervision must keep its timing. Returns the
    latencies and the gateway's completed requests per second."""
    stamps = tmp / "stamps"
    port = free_port()
    cmd = STAMP.format(file=stamps, port=port)
    models = f"""\
    web:
      backend: command
      command: [sh, -c, "{cmd}"]
      port: {port}
      health_path: /
      restart: {{backoff_initial: 0s, backoff_max: 0s, max_restarts: 100000, window: 1s}}
    chat:
      backend: vllm
      model: org/chat
      served_name: chat
      port: {free_port()}
      env: {{FAKE_TOKEN_DELAY: "0.002"}}
    """
    out = []
    d = Daemon(tmp, models)
    gw = free_port()
    d.manifest.write_text(f"gateway: {{port: {gw}}}\n" + d.manifest.read_text())
    loader = None
    rate = 0.0
    try:
        d.start()
        d.wait_all_ready()
        if load:
            url = f"http://127.0.0.1:{gw}/v1/chat/completions"
            loader = subprocess.Popen([sys.executable, "-c", LOAD, url, str(load)])
            time.sleep(2)
        served0 = _gateway_requests(gw)
        t_start = time.time()
        for i in range(kills):
            pid = d.status()["web"]["pid"]
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)
            started = wait_for(partial(last_stamp, stamps, i + 2), 10)
            out.append(started - t0)
            d.wait_state("web", "READY")
        rate = (_gateway_requests(gw) - served0) / (time.time() - t_start)
    finally:
        if loader is not None:
            loader.kill()
            loader.wait()
        d.stop()
    return out, rate


def _gateway_requests(port: int) -> float:
    """requests_total of the gateway, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "llmsup_gateway_requests"
        for s in f.samples
        if s.name.endswith("_total")
    )


def respawn_vllm_tree(tmp: Path, kills: int) -> list[float]:
    """The same for a fake vLLM with TP=2: the orphaned EngineCore and workers
    must be gone before the new server starts. The new pid is watched through
    the control API (a status call takes ~0.5 ms)."""
    port = free_port()
    models = f"""\
    m:
      backend: vllm
      model: org/m
      gpus: [0, 1]
      port: {port}
      env: {{FAKE_LOAD_TIME: "0.1"}}
      restart: {{backoff_initial: 0s, backoff_max: 0s, max_restarts: 100000, window: 1s}}
    """
    out = []
    d = Daemon(tmp, models)
    try:
        d.start()
        d.wait_all_ready()
        for _ in range(kills):
            pid = d.status()["m"]["pid"]
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)

            def new_pid(pid: int = pid) -> int | None:
                p = d.status()["m"]["pid"]
                return p if p and p != pid else None

            wait_for(new_pid, 10, interval=0.001)
            out.append(time.time() - t0)  # seen through `status`: ~0.5 ms late
            d.wait_state("m", "READY")
    finally:
        d.stop()
    return out


async def _bare_respawner(cmd: str, kills: int, stamps: Path) -> list[float]:
    """The floor: an asyncio loop that only awaits exit and spawns again."""
    out: list[float] = []
    proc = await asyncio.create_subprocess_exec("sh", "-c", cmd, start_new_session=True)
    for i in range(kills):
        while last_stamp(stamps, i + 1) is None:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.3)
        t0 = time.time()
        proc.kill()
        await proc.wait()
        proc = await asyncio.create_subprocess_exec("sh", "-c", cmd, start_new_session=True)
        while (started := last_stamp(stamps, i + 2)) is None:
            await asyncio.sleep(0.001)
        out.append(started - t0)
    proc.kill()
    await proc.wait()
    return out


def respawn_baseline(tmp: Path, kills: int) -> list[float]:
    stamps = tmp / "stamps-bare"
    return asyncio.run(_bare_respawner(STAMP.format(file=stamps, port=free_port()), kills, stamps))


# ------------------------------------------------------------- readiness lag


def readiness_lag(tmp: Path, starts: int) -> tuple[list[float], list[float], list[float]]:
    """From the moment the fake's port accepts to `status` saying READY.

    The fake writes the time it began to accept (FAKE_LISTEN_STAMP), right after
    its last log line ("Application startup complete."), as real vLLM does; the
    daemon is polled for READY every 2 ms. Samples are kept as measured (never
    clamped): READY seen before the port accepts would be a negative lag.
    Returns the lags, the lags of a baseline (a thread here that polls /health
    every 2 ms, as fast as any outside prober), and how long one status call
    takes (the measuring floor)."""
    port = free_port()
    stamps = tmp / "listen-stamps"
    models = f"""\
    m:
      backend: vllm
      model: org/m
      port: {port}
      env: {{FAKE_LOAD_TIME: "1.0", FAKE_LISTEN_STAMP: "{stamps}"}}
    """
    lags, polled, calls = [], [], []
    d = Daemon(tmp, models)
    try:
        d.start()
        d.wait_all_ready()
        for _ in range(starts):
            d.cli("stop", "-f", str(d.manifest), "m")
            stamps.unlink(missing_ok=True)
            first_200: list[float] = []
            poller = threading.Thread(target=_first_200, args=(port, first_200))
            poller.start()
            d.cli("start", "-f", str(d.manifest), "m")
            while True:
                c0 = time.time()
                state = d.status()["m"]["state"]
                calls.append(time.time() - c0)
                if state == "READY":
                    ready = time.time()
                    break
                time.sleep(0.002)
            listened = wait_for(lambda: stamps.exists() and stamps.read_text().strip(), 10)
            poller.join()
            accepted = float(str(listened).split()[0])
            lags.append(ready - accepted)
            polled.append(first_200[0] - accepted)
    finally:
        d.stop()
    return lags, polled, calls


def _first_200(port: int, out: list[float]) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    out.append(time.time())
                    return
        except OSError:
            pass
        time.sleep(0.002)


def readiness_figures(lags: list[float], polled: list[float], calls: list[float]) -> Any:
    return {
        "readiness_lag": summary_ms(lags),
        "readiness_lag_min_ms": min(lags) * 1000,
        "readiness_baseline_2ms_health_poller": summary_ms(polled),
        "readiness_ratio_vs_poller": statistics.median(lags) / statistics.median(polled),
        "status_call": summary_ms(calls),
    }


# ------------------------------------------------------------------ footprint


def cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def footprint(tmp: Path, n: int, idle: float) -> dict[str, Any]:
    models = "".join(
        f"m{i}: {{backend: vllm, model: org/m{i}, port: {free_port()}, gpus: [{i}], "
        f"health: {{interval: 10s, timeout: 5s, failures: 3}}, "
        f"env: {{FAKE_LOAD_TIME: '0.5'}}}}\n"
        for i in range(n)
    )
    d = Daemon(tmp, models)
    bare = subprocess.Popen(
        [sys.executable, "-c", "import asyncio, aiohttp, psutil; asyncio.run(asyncio.sleep(3600))"]
    )
    try:
        t0 = time.monotonic()
        d.start()
        d.wait_all_ready(timeout=120)
        up = time.monotonic() - t0
        assert d.proc is not None
        daemon = psutil.Process(d.proc.pid)
        base = psutil.Process(bare.pid)
        time.sleep(2)
        c0, b0 = cpu_seconds(daemon), cpu_seconds(base)
        time.sleep(idle)
        cpu = (cpu_seconds(daemon) - c0) / idle
        cpu_bare = (cpu_seconds(base) - b0) / idle
        t = time.monotonic()
        r = d.cli("status", "-f", str(d.manifest))
        status_wall = time.monotonic() - t
        assert r.returncode == 0
        return {
            "models": n,
            "up_to_all_ready_s": up,
            "fake_load_time_s": 0.5,
            "daemon_rss_mib": daemon.memory_info().rss / 2**20,
            "bare_python_aiohttp_rss_mib": base.memory_info().rss / 2**20,
            "daemon_idle_cpu_percent": cpu * 100,
            "bare_idle_cpu_percent": cpu_bare * 100,
            "status_cli_wall_s": status_wall,
            "open_fds": daemon.num_fds(),
        }
    finally:
        bare.kill()
        bare.wait()
        d.stop()


def respawn_figures(t: Path, kills: int) -> dict[str, Any]:
    """Respawn when idle, the bare-asyncio floor, and respawn while the gateway relays
    32 streams: all in this run, so the ratios compare like with like."""
    ours, _ = respawn_llmsup(t / "a", kills)
    bare = respawn_baseline(t / "b", kills)
    loaded, rate = respawn_llmsup(t / "f", kills, load=32)
    return {
        "respawn_command_server": summary_ms(ours),
        "respawn_bare_asyncio_baseline": summary_ms(bare),
        "respawn_ratio_vs_baseline": statistics.median(ours) / statistics.median(bare),
        "respawn_under_gateway_load_32_streams": summary_ms(loaded),
        "respawn_under_load_ratio_vs_idle": statistics.median(loaded) / statistics.median(ours),
        "gateway_streams_completed_per_s_during_kills": rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--models", type=int, default=32)
    ap.add_argument("--idle", type=float, default=20.0)
    ap.add_argument(
        "--only", choices=["readiness", "respawn"], help="run one part, keep the other results"
    )
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with tempfile.TemporaryDirectory(prefix="llmsup-bench-") as tmp:
        t = Path(tmp)
        for sub in ("a", "b", "c", "d", "e", "f"):
            (t / sub).mkdir()
        if args.only == "readiness":
            old = json.loads((RESULTS / "supervisor.json").read_text())
            res = {**old, "readiness_when": res["when"]}
            res.update(readiness_figures(*readiness_lag(t / "d", args.starts)))
            (RESULTS / "supervisor.json").write_text(json.dumps(res, indent=2))
            print(json.dumps(res, indent=2))
            return
        if args.only == "respawn":
            old = json.loads((RESULTS / "supervisor.json").read_text())
            res = {**old, "respawn_when": res["when"]}
        res.update(respawn_figures(t, args.kills))
        if args.only == "respawn":
            (RESULTS / "supervisor.json").write_text(json.dumps(res, indent=2))
            print(json.dumps(res, indent=2))
            return
        res["respawn_vllm_tp2_with_orphan_cleanup"] = summary_ms(
            respawn_vllm_tree(t / "c", args.kills)
        )
        res.update(readiness_figures(*readiness_lag(t / "d", args.starts)))
        res["footprint"] = footprint(t / "e", args.models, args.idle)
    (RESULTS / "supervisor.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
