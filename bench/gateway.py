"""Gateway overhead: the gateway vs calling a fake vLLM directly, with nginx as reference.

    .venv/bin/python bench/gateway.py [--seconds 5] [--streams 20]

Needs `wrk` and `nginx` on PATH (Debian: apt-get install wrk nginx-light). Starts
two fake vLLM servers (FAKE_TOKEN_DELAY=0 for request latency, 0.01 for stream
timing), the gateway in its own process as the daemon runs it (llmsup.gateway.worker,
on asyncio's own loop) and once more on uvloop (`gateway_uvloop`), and nginx as a
plain reverse proxy (1 worker, upstream keepalive, proxy_buffering off).
Writes bench/results/gateway.json.

- Non-streaming latency and throughput: wrk (C, one thread; a Lua script sends the
  POST body) for a fixed time at 1 and 32 connections against each target.
- Streaming: an aiohttp client records when each SSE event arrives, measured from
  the request start; the delay a proxy adds to a chunk is its arrival time minus the
  direct arrival time of the same chunk (medians over requests).
- Event-loop lag inside the gateway process during each phase (a 5 ms ticker,
  exported through the gateway's extra_collector hook): what supervision timing
  suffered when the gateway shared the daemon's loop.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.util import FAKES_DIR, fake_env, free_port, wait_for  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEPLOYED_LOOP = "asyncio"  # as llmsup.gateway.worker runs
GATEWAYS = ("gateway", "gateway_uvloop")  # as deployed, and on uvloop
MODEL = "bench-model"
BODY = json.dumps({"model": MODEL, "prompt": "hello there", "max_tokens": 4})
WRK_LUA = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nRESULT {"requests":%%d,"duration_us":%%d,"errors":%%d,"non2xx":%%d,' ..
    '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""
# The fake's http.server writes headers and body separately; with Nagle's algorithm
# and delayed ACKs that costs ~40 ms per request, hiding everything measured here.
# Real vLLM (uvicorn on asyncio) sets TCP_NODELAY, so the bench does too.
FAKE_NODELAY = f"""
import socketserver, sys
sys.path.insert(0, {str(FAKES_DIR)!r})
socketserver.StreamRequestHandler.disable_nagle_algorithm = True
from _fakevllm import main
sys.exit(main(sys.argv[1:]))
"""
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  upstream fast {{ server 127.0.0.1:{fast}; keepalive 64; }}
  upstream slow {{ server 127.0.0.1:{slow}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{nginx};
    location /slow/ {{ proxy_pass http://slow/; {common} }}
    location / {{ proxy_pass http://fast; {common} }}
  }}
}}
"""
NGINX_COMMON = (
    'proxy_http_version 1.1; proxy_set_header Connection ""; '
    "proxy_buffering off; proxy_request_buffering off; proxy_read_timeout 600s;"
)


# ------------------------------------------------------------ the gateway process


def serve_gateway(port: int, fast_url: str, slow_url: str, loop: str) -> None:
    """Runs in a child process: the gateway with a fixed registry and a lag probe, on
    `loop` (asyncio: as llmsup.gateway.worker runs it; or uvloop, to compare)."""
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

    from llmsup.gateway.app import create_app, serve
    from llmsup.gateway.config import GatewayConfig
    from llmsup.gateway.routing import Route

    class Fixed:
        def __init__(self) -> None:
            self.table = {
                MODEL: Route(MODEL, "fast", "vllm", fast_url, None, "READY", "", False),
                "slow": Route("slow", "slow", "vllm", slow_url, None, "READY", "", False),
            }

        def routes(self) -> list[Route]:
            return list(self.table.values())

        async def acquire(self, served_name: str, wait: float) -> Route:
            return self.table[served_name]

        def failed(self, route: Route, failure: Any, error: str) -> None:
            pass

        def another(self, route: Route) -> Route | None:
            return None

        def release(self, route: Route) -> None:
            pass

    lags: list[float] = []

    class LoopLag(Collector):
        def collect(self) -> Iterator[Metric]:
            got, lags[:] = sorted(lags) or [0.0], []
            g = GaugeMetricFamily("bench_loop_lag_seconds", "since last scrape", labels=["q"])
            g.add_metric(["p99"], got[int(0.99 * (len(got) - 1))])
            g.add_metric(["max"], got[-1])
            yield g

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 0.005
            await asyncio.sleep(0.005)
            lags.append(max(0.0, loop.time() - due))

    async def main() -> None:
        app = create_app(
            Fixed(), GatewayConfig(aliases={"slow-alias": "slow"}, extra_collector=LoopLag())
        )
        runner = await serve(app, "127.0.0.1", port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        task = asyncio.create_task(probe())
        await stop.wait()
        task.cancel()
        await runner.cleanup()

    if loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main())


# ------------------------------------------------------------ helpers


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def answers(url: str) -> bool:
    try:
        req = urllib.request.Request(url, data=BODY.encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def loop_lag(gateway: str) -> dict[str, float]:
    with urllib.request.urlopen(gateway + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("bench_loop_lag_seconds{"):
            q = line.split('q="')[1].split('"')[0]
            out[f"{q}_ms"] = float(line.rsplit(" ", 1)[1]) * 1000
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (nginx's worker)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(t.user + t.system for t in (p.cpu_times() for p in procs))


def wrk(
    url: str, connections: int, seconds: int, script: Path, proxy: int | None
) -> dict[str, float]:
    """wrk's figures; with `proxy` (a pid), also its CPU time per request."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]
    subprocess.run([*argv[:3], "-d1s", *argv[4:]], capture_output=True, check=True)  # warm up
    cpu = cpu_seconds(proxy) if proxy else 0.0
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    res = json.loads(out.split("RESULT ", 1)[1])
    extra = {}
    if proxy:
        extra["proxy_cpu_us_per_request"] = (cpu_seconds(proxy) - cpu) / res["requests"] * 1e6
    return extra | {
        "rps": res["requests"] / (res["duration_us"] / 1e6),
        "p50_ms": res["p50_us"] / 1000,
        "p90_ms": res["p90_us"] / 1000,
        "p99_ms": res["p99_us"] / 1000,
        "errors": res["errors"] + res["non2xx"],
    }


async def stream_times(urls: dict[str, str], model: dict[str, str], n: int, conc: int) -> Any:
    """{target: per-event median arrival time (s from request start)}, interleaved runs."""
    tokens = 20
    times: dict[str, list[list[float]]] = {k: [] for k in urls}

    async def one(session: aiohttp.ClientSession, target: str) -> None:
        body = {"model": model[target], "prompt": "hi", "max_tokens": tokens, "stream": True}
        started = time.perf_counter()
        stamps: list[float] = []
        async with session.post(urls[target], json=body) as r:
            assert r.status == 200, await r.text()
            async for chunk in r.content.iter_any():
                stamps += [time.perf_counter() - started] * chunk.count(b"data:")
        assert len(stamps) == tokens + 1, stamps  # the tokens, then [DONE]
        times[target].append(stamps)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(n):
            for target in urls:
                await asyncio.gather(*(one(session, target) for _ in range(conc)))
    return {
        t: [statistics.median(run[k] for run in runs) for k in range(tokens + 1)]
        for t, runs in times.items()
    }


def stream_summary(per_event: dict[str, list[float]]) -> dict[str, Any]:
    direct = per_event["direct"]
    out: dict[str, Any] = {}
    for target, t in per_event.items():
        gaps = [b - a for a, b in itertools.pairwise(t)]
        row = {"first_event_ms": t[0] * 1000, "median_gap_ms": statistics.median(gaps) * 1000}
        if target != "direct":
            # added: how much later each chunk arrives than directly; added_gap: how much
            # the spacing between chunks grows (the per-chunk relay cost alone).
            added = [(a - d) * 1000 for a, d in zip(t, direct, strict=True)]
            direct_gap = statistics.median(b - a for a, b in itertools.pairwise(direct))
            row["added_gap_ms"] = row["median_gap_ms"] - direct_gap * 1000
            row |= {
                "added_per_chunk_median_ms": statistics.median(added),
                "added_max_ms": max(added),
            }
        out[target] = row
    return out


# ------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=5, help="duration of each wrk run")
    ap.add_argument("--streams", type=int, default=20, help="streamed requests per target")
    ap.add_argument(
        "--serve-gateway", nargs=4, metavar=("PORT", "FAST", "SLOW", "LOOP"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.serve_gateway:
        port, fast, slow, loop = args.serve_gateway
        return serve_gateway(int(port), fast, slow, loop)
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            sys.exit(f"{tool} not found: apt-get install wrk nginx-light")

    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="llmsup-bench-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            ports = {k: free_port() for k in ("fast", "slow", "gateway", "gateway_uvloop", "nginx")}
            for name, delay in (("fast", 0), ("slow", 0.01)):
                argv = [sys.executable, "-c", FAKE_NODELAY, "serve", "org/m", "--host", "127.0.0.1"]
                argv += ["--port", str(ports[name]), "--disable-uvicorn-access-log"]
                argv += ["--served-model-name", MODEL if name == "fast" else "slow"]
                env = fake_env(FAKE_LOAD_TIME=0.1, FAKE_TOKEN_DELAY=delay)
                procs.append(start(argv, tmp / f"{name}.log", env))
            fast, slow = (f"http://127.0.0.1:{ports[k]}" for k in ("fast", "slow"))
            # The gateway as deployed (asyncio's own loop), and on uvloop.
            gw, gw_asyncio = (f"http://127.0.0.1:{ports[k]}" for k in ("gateway", "gateway_uvloop"))
            gw_procs = {}
            for name, loop in (("gateway", DEPLOYED_LOOP), ("gateway_uvloop", "uvloop")):
                argv = [sys.executable, __file__, "--serve-gateway", str(ports[name]), fast, slow]
                gw_procs[name] = start([*argv, loop], tmp / f"{name}.log")
                procs.append(gw_procs[name])
            conf = NGINX_CONF.format(tmp=tmp, common=NGINX_COMMON, **ports)
            (tmp / "nginx.conf").write_text(conf)
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            ngx_proc = start([nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf")], tmp / "ng.log")
            procs.append(ngx_proc)
            ngx = f"http://127.0.0.1:{ports['nginx']}"
            targets = {"direct": fast, "gateway": gw, "gateway_uvloop": gw_asyncio, "nginx": ngx}
            for name, url in targets.items():
                wait_for(partial(answers, url + "/v1/completions"), 20, message=f"{name} down")

            script = tmp / "post.lua"
            script.write_text(WRK_LUA % BODY)
            res: dict[str, Any] = {
                "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}",
                "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                "load_generator": "wrk 1 thread, Lua POST body; streams: aiohttp client",
                "gateway_loop": DEPLOYED_LOOP,
                "nginx": "1 worker, upstream keepalive 64, proxy_buffering off",
                "request": BODY,
                "seconds_per_run": args.seconds,
                "nonstreaming": {},
                "loop_lag": {},
            }
            loop_lag(gw)  # reset
            for conc in (1, 32):
                row: dict[str, Any] = {}
                for name, url in targets.items():
                    pids = {k: p.pid for k, p in gw_procs.items()} | {"nginx": ngx_proc.pid}
                    pid = pids.get(name)
                    row[name] = wrk(url + "/v1/completions", conc, args.seconds, script, pid)
                    if name == "gateway":
                        res["loop_lag"][f"wrk_c{conc}"] = loop_lag(gw)
                d, g, n = row["direct"], row["gateway"], row["nginx"]
                row["gateway_added_p50_ms"] = g["p50_ms"] - d["p50_ms"]
                row["gateway_uvloop_added_p50_ms"] = row["gateway_uvloop"]["p50_ms"] - d["p50_ms"]
                row["gateway_added_p99_ms"] = g["p99_ms"] - d["p99_ms"]
                row["nginx_added_p50_ms"] = n["p50_ms"] - d["p50_ms"]
                row["nginx_added_p99_ms"] = n["p99_ms"] - d["p99_ms"]
                row["gateway_p50_ratio_vs_direct"] = g["p50_ms"] / d["p50_ms"]
                row["gateway_p50_ratio_vs_nginx"] = g["p50_ms"] / n["p50_ms"]
                row["gateway_rps_ratio_vs_direct"] = g["rps"] / d["rps"]
                row["gateway_rps_ratio_vs_nginx"] = g["rps"] / n["rps"]
                res["nonstreaming"][f"c{conc}"] = row

            urls = {"direct": slow, "gateway": gw, "gateway_uvloop": gw_asyncio}
            urls = {k: v + "/v1/completions" for k, v in (urls | {"nginx": ngx + "/slow"}).items()}
            model = {"direct": "slow", "nginx": "slow"}
            model |= {"gateway": "slow-alias", "gateway_uvloop": "slow-alias"}
            res["streaming"] = {"tokens": 20, "token_delay_ms": 10}
            for conc, n_runs in ((1, args.streams), (32, max(2, args.streams // 5))):
                loop_lag(gw)
                proxies = {k: p.pid for k, p in gw_procs.items()} | {"nginx": ngx_proc.pid}
                cpu = {k: cpu_seconds(pid) for k, pid in proxies.items()}
                per_event = asyncio.run(stream_times(urls, model, n_runs, conc))
                row = stream_summary(per_event)
                chunks = n_runs * conc * len(per_event["direct"])  # per target
                for k, pid in proxies.items():  # CPU each proxy spent per relayed chunk
                    row[k]["proxy_cpu_us_per_chunk"] = (cpu_seconds(pid) - cpu[k]) / chunks * 1e6
                res["streaming"][f"c{conc}"] = row
                res["loop_lag"][f"streams_c{conc}_all_targets"] = loop_lag(gw)
        finally:
            for proc in reversed(procs):
                stop(proc)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gateway.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
