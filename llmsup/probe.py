"""HTTP probes: readiness and liveness (a GET for a 200), and the deep probe (a
1-token completion). A backend's own steps: its module (`llmsup.backends`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency: float
    detail: str


async def get_ok(
    session: aiohttp.ClientSession,
    url: str,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> ProbeResult:
    """GET `url`: ok on a 200 within `timeout`."""
    start = time.monotonic()
    try:
        async with session.get(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            await r.read()
            ok = r.status == 200
            return ProbeResult(ok, time.monotonic() - start, f"HTTP {r.status}")
    except asyncio.TimeoutError:
        return ProbeResult(False, time.monotonic() - start, f"no answer within {timeout:g}s")
    except aiohttp.ClientError as e:
        return ProbeResult(False, time.monotonic() - start, type(e).__name__)


async def completion_ok(
    session: aiohttp.ClientSession,
    base: str,
    model: str,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> ProbeResult:
    """The deep probe: a 1-token completion, for an engine that is hung behind a 200 /health."""
    start = time.monotonic()
    body = {"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0}
    try:
        async with session.post(
            f"{base}/v1/completions",
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            await r.read()
            return ProbeResult(r.status == 200, time.monotonic() - start, f"HTTP {r.status}")
    except asyncio.TimeoutError:
        return ProbeResult(
            False, time.monotonic() - start, f"completion: no answer within {timeout:g}s"
        )
    except aiohttp.ClientError as e:
        return ProbeResult(False, time.monotonic() - start, type(e).__name__)
