"""Remote models: what one more gateway costs, and what a stopped upstream loses.

    .venv/bin/python bench/multihost.py [--requests 1000] [--streams 8] [--quick 4] [--seconds 4]

Three llmsup daemons on this machine, as in tests/test_remote.py: B and C each
supervise two fake vLLM servers behind their gateway, `fast` (no delay per token)
and `slow` (10 ms a token); A's gateway has no server and serves both as remote
models over B and C (probed every 300 ms).

- Latency: the same 1-token completion of `fast` (non-streamed; and streamed, to
  its first chunk) sent in turn to B, C (one hop: client -> gateway -> server)
  and A (two hops: client -> gateway A -> gateway B or C -> server), one request
  at a time over kept-alive connections: p50/p99 of each path, and the
  difference, in the same run.
- Failover: `--streams` clients stream completions of `slow` (0.2 to 6 s each)
  through A without pause, and `--quick` clients send 1-token completions of
  `fast` one after another, while B is stopped: first with `llmsup down` (its
  gateway gives the streams in flight 5 s), then, once B is back, by SIGKILL of
  its daemon and gateway (a host that dies). Each request is counted as answered
  whole, cut after its first bytes (it was streaming from B), or failed before
  its first byte: lost, of which the target is none. The time from B's model
  READY again to A routing to it is measured too.

Writes bench/results/multihost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import pct  # noqa: E402
from llmsup.client import call  # noqa: E402
from tests.supervisor_util import Daemon  # noqa: E402
from tests.util import free_port, wait_for  # noqa: E402

RESULTS = ROOT / "bench" / "results"
KEY = "bench-upstream-key"  # B's and C's gateways ask for it
A_KEY = "bench-a-key"
INTERVAL = 0.3  # A's probes


@dataclass
class Host:
    daemon: Daemon
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def upstream_host(tmp: Path, name: str) -> Host:
    (tmp / name).mkdir()
    port = free_port()
    models = ""
    for model, delay in (("fast", "0"), ("slow", "0.01")):
        models += (
            f"{model}: {{backend: vllm, model: org/{model}, served_name: {model}, "
            f"port: {free_port()}, gpu_memory_utilization: 0.4, "
            f"env: {{FAKE_TOKEN_DELAY: '{delay}'}}}}\n"
        )
    d = Daemon(tmp / name, models)
    d.manifest.write_text(
        f"gateway: {{port: {port}, api_keys: [{KEY}]}}\n" + d.manifest.read_text()
    )
    return Host(d, port)


def gateway_host(tmp: Path, upstreams: list[Host]) -> Host:
    (tmp / "a").mkdir()
    port = free_port()
    urls = ", ".join(f"'{u.url}'" for u in upstreams)
    health = f"{{interval: {INTERVAL}s, timeout: 1s, failures: 2}}"
    models = "".join(
        f"{m}: {{backend: remote, urls: [{urls}], api_key: {KEY}, health: {health}}}\n"
        for m in ("fast", "slow")
    )
    d = Daemon(tmp / "a", models)
    d.manifest.write_text(
        f"gateway: {{port: {port}, api_keys: [{A_KEY}]}}\n" + d.manifest.read_text()
    )
    return Host(d, port)


def remote_upstreams(a: Host) -> dict[tuple[str, str], str]:
    """(model, upstream URL) -> its state at A."""
    _, data = call(a.daemon.sock, "GET", "/v1/status", timeout=10)
    return {(r["name"], u["url"]): u["state"] for r in data["remotes"] for u in r["upstreams"]}


# ------------------------------------------------------------------ latency


async def timed(session: aiohttp.ClientSession, host: Host, key: str, stream: bool) -> float | None:
    """Seconds to the whole answer (or, streamed, to its first chunk); None: failed."""
    body = {"model": "fast", "prompt": "hi", "max_tokens": 1, "stream": stream}
    began = time.perf_counter()
    async with session.post(
        f"{host.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        if r.status != 200:
            return None
        if stream:
            await r.content.readline()
            took = time.perf_counter() - began
            await r.read()
            return took
        await r.read()
        return time.perf_counter() - began


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(pct(values, 0.5) * 1000, 3),
        "p99_ms": round(pct(values, 0.99) * 1000, 3),
    }


async def latency(a: Host, b: Host, c: Host, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for stream in (False, True):
            one: list[float] = []
            two: list[float] = []
            failed = 0
            for i in range(n + 50):  # the first 50: warm-up, not counted
                for host, key, into in ((b, KEY, one), (c, KEY, one), (a, A_KEY, two)):
                    took = await timed(session, host, key, stream)
                    if took is None:
                        failed += 1
                    elif i >= 50:
                        into.append(took)
            kind = "first_chunk_streamed" if stream else "non_streamed"
            out[kind] = {
                "one_hop": summary(one),
                "two_hops": summary(two),
                "added_p50_ms": round((pct(two, 0.5) - pct(one, 0.5)) * 1000, 3),
                "added_p99_ms": round((pct(two, 0.99) - pct(one, 0.99)) * 1000, 3),
                "failed": failed,
            }
    return out


# ------------------------------------------------------------------ failover


@dataclass
class Outcome:
    began: float
    ended: float
    how: str  # "whole" | "cut" (after its first bytes) | "lost" (before them)
    detail: str = ""


async def stream_once(session: aiohttp.ClientSession, a: Host, tokens: int) -> Outcome:
    """A stream of `slow` (`tokens` > 0), or a 1-token answer of `fast` (0)."""
    began, got = time.monotonic(), False
    body: dict[str, Any] = {"model": "slow", "prompt": "hi", "max_tokens": tokens, "stream": True}
    if tokens == 0:
        body = {"model": "fast", "prompt": "hi", "max_tokens": 1}
    try:
        async with session.post(
            f"{a.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {A_KEY}"}
        ) as r:
            if r.status != 200:
                text = (await r.read()).decode(errors="replace")[:200]
                return Outcome(began, time.monotonic(), "lost", f"{r.status}: {text}")
            if tokens == 0:
                await r.read()
                return Outcome(began, time.monotonic(), "whole")
            async for line in r.content:
                got = True
                if line.startswith(b"data: [DONE]"):
                    return Outcome(began, time.monotonic(), "whole")
                if line.startswith(b'data: {"error"'):
                    return Outcome(began, time.monotonic(), "cut", line[6:200].decode())
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return Outcome(began, time.monotonic(), "cut" if got else "lost", repr(e)[:200])
    return Outcome(began, time.monotonic(), "cut" if got else "lost", "ended without [DONE]")


async def under_load(
    a: Host, streams: int, quick: int, seconds: float, fault: Any
) -> dict[str, Any]:
    """`streams` clients stream through A, `quick` ones send short requests;
    `fault()` (blocking) runs once they are under way, and the load goes on
    `seconds` after it returned."""
    rng = random.Random(1)
    outcomes: list[Outcome] = []
    shorts: list[Outcome] = []
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession, short: bool) -> None:
        while not stop.is_set():
            if short:
                shorts.append(await stream_once(session, a, 0))
            else:
                outcomes.append(await stream_once(session, a, rng.randint(20, 600)))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(client(session, i >= streams)) for i in range(streams + quick)]
        await asyncio.sleep(2.0)
        began = time.monotonic()
        await asyncio.to_thread(fault)
        fault_s = time.monotonic() - began
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
    counts = Counter(o.how for o in outcomes)
    short = Counter(o.how for o in shorts)
    return {
        "streams": {
            "requests": len(outcomes),
            "whole": counts["whole"],
            "cut_after_first_bytes": counts["cut"],
            "lost_before_first_byte": counts["lost"],
        },
        "short_requests": {"requests": len(shorts), "answered": short["whole"]},
        "lost_before_first_byte": counts["lost"] + short["lost"],
        "fault_took_s": round(fault_s, 2),
        "lost_details": [o.detail for o in outcomes + shorts if o.how == "lost"][:10],
        "cut_details": sorted({o.detail[:120] for o in outcomes if o.how == "cut"})[:5],
    }


def kill_host(h: Host) -> None:
    """SIGKILL B's daemon and its gateway process: a host that dies (its servers
    linger, unreachable through the gateway)."""
    _, data = call(h.daemon.sock, "GET", "/v1/status", timeout=10)
    gateway_pid = data["gateway"]["pid"]
    assert h.daemon.proc is not None
    h.daemon.proc.send_signal(signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(gateway_pid, signal.SIGKILL)
    h.daemon.proc.wait(10)


def back(a: Host, b: Host) -> float:
    """Start B again: seconds from its models READY to A routing to it."""
    b.daemon.start()
    b.daemon.wait_all_ready()
    ready = time.monotonic()
    wait_for(
        lambda: all(remote_upstreams(a)[(m, b.url)] == "up" for m in ("fast", "slow")),
        20,
        interval=0.02,
    )
    return time.monotonic() - ready


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="per path and kind")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams")
    parser.add_argument("--quick", type=int, default=4, help="clients of short requests")
    parser.add_argument("--seconds", type=float, default=4.0, help="load after each fault")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmsup-multihost-"))
    b, c = upstream_host(tmp, "b"), upstream_host(tmp, "c")
    a = gateway_host(tmp, [b, c])
    result: dict[str, Any] = {
        "machine": f"{platform.node() and 'vm'} {os.cpu_count()} cpus, {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "setup": "3 llmsup daemons on one machine (loopback); B and C: a fake vLLM behind "
        "their gateway; A: remote models over B and C, probed every 300 ms",
    }
    try:
        for h in (b, c, a):
            h.daemon.start()
        for h in (b, c):
            h.daemon.wait_all_ready()
        wait_for(lambda: set(remote_upstreams(a).values()) == {"up"}, 20)
        print("latency ...", flush=True)
        result["latency"] = asyncio.run(latency(a, b, c, args.requests))
        print("failover: llmsup down ...", flush=True)
        result["failover_down"] = asyncio.run(
            under_load(a, args.streams, args.quick, args.seconds, b.daemon.stop)
        )
        result["recovery_s"] = round(back(a, b), 3)
        print("failover: SIGKILL ...", flush=True)
        result["failover_kill"] = asyncio.run(
            under_load(a, args.streams, args.quick, args.seconds, lambda: kill_host(b))
        )
    finally:
        for h in (a, b, c):
            h.daemon.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "multihost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
