"""HTTP probes and Ollama's post-start steps (pull, preload, check loaded)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from llmsup.errors import StepError as StepError


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


async def ollama_pull(
    session: aiohttp.ClientSession, base: str, model: str, progress: Callable[[str], None]
) -> None:
    """`POST /api/pull`, streaming; an error can arrive as the last line after a 200."""
    async with session.post(
        f"{base}/api/pull",
        json={"model": model, "stream": True},
        timeout=aiohttp.ClientTimeout(total=None, sock_read=300),
    ) as r:
        if r.status != 200:
            raise StepError(f"pull {model}: HTTP {r.status}: {(await r.text())[:200]}")
        last = ""
        async for raw in r.content:
            if not raw.strip():
                continue
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if "error" in msg:
                raise StepError(f"pull {model}: {msg['error']}")
            last = str(msg.get("status", ""))
            total, done = msg.get("total"), msg.get("completed")
            if total and done is not None:
                progress(f"pulling {model} {100 * done // total}%")
            else:
                progress(f"pull {model}: {last}")
        if last != "success":
            raise StepError(f"pull {model}: stream ended without success (last: {last!r})")


async def ollama_preload(
    session: aiohttp.ClientSession, base: str, model: str, keep_alive: int | str, timeout: float
) -> None:
    """Load `model` and keep it: `/api/generate` with no prompt."""
    async with session.post(
        f"{base}/api/generate",
        json={"model": model, "keep_alive": keep_alive},
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as r:
        text = await r.text()
        if r.status != 200:
            raise StepError(f"preload {model}: HTTP {r.status}: {text[:200]}")


async def ollama_loaded(session: aiohttp.ClientSession, base: str, timeout: float) -> set[str]:
    async with session.get(f"{base}/api/ps", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        if r.status != 200:
            raise StepError(f"/api/ps: HTTP {r.status}")
        data = await r.json()
    return {str(m.get("name")) for m in data.get("models", [])} | {
        str(m.get("model")) for m in data.get("models", [])
    }
