"""Ollama's HTTP API as its backend's steps use it (FACTS.md has its behaviour):
pull each model, load it and keep it loaded, and load it again when a runner
that died has unloaded it. Effects: HTTP, through the daemon's session."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import aiohttp

from llmsup.backends.base import Http
from llmsup.backends.launch import Launch
from llmsup.errors import StepError
from llmsup.probe import ProbeResult

PS_TIMEOUT = 10.0  # the check of /api/ps after the preloads


async def post_start(
    launch: Launch, http: Http, report: Callable[[str], None], timeout: float
) -> str | None:
    """Pull each model the server does not have (as `ollama run` does: a host that
    cannot reach the registry still serves what it has), preload each, then check
    that /api/ps lists each; None when done, else why not. `timeout`: what one
    preload may take."""
    step = "/api/tags"
    try:
        on_disk = await tags(http, PS_TIMEOUT)
        for load in launch.ollama_loads:
            if tagged(load.model) not in on_disk:
                step = f"pull {load.model}"
                await pull(http, load.model, report)
            report(f"loading {load.model}")
            step = f"preload {load.model}"
            await preload(http, load.model, load.keep_alive, timeout)
        step = "/api/ps"
        have = await loaded(http, PS_TIMEOUT)
    except StepError as e:
        return str(e)
    except aiohttp.ClientError as e:
        return f"{step}: {str(e) or type(e).__name__}"
    except asyncio.TimeoutError:
        return f"{step}: no answer in time"
    missing = [x.model for x in launch.ollama_loads if x.model not in have]
    return f"not in /api/ps after preload: {', '.join(missing)}" if missing else None


async def still_loaded(launch: Launch, http: Http, timeout: float) -> ProbeResult:
    """A runner that died unloads its model: load it again, as `ollama run` would."""
    start = time.monotonic()
    try:
        have = await loaded(http, timeout)
        for load in launch.ollama_loads:
            if load.model not in have:
                await preload(http, load.model, load.keep_alive, timeout)
    except (StepError, aiohttp.ClientError, asyncio.TimeoutError) as e:
        return ProbeResult(False, time.monotonic() - start, str(e) or type(e).__name__)
    return ProbeResult(True, time.monotonic() - start, "loaded")


async def pull(http: Http, model: str, progress: Callable[[str], None]) -> None:
    """`POST /api/pull`, streaming; an error can arrive as the last line after a 200."""
    async with http.session.post(
        f"{http.base}/api/pull",
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


async def preload(http: Http, model: str, keep_alive: int | str, timeout: float) -> None:
    """Load `model` and keep it: `/api/generate` with no prompt."""
    async with http.session.post(
        f"{http.base}/api/generate",
        json={"model": model, "keep_alive": keep_alive},
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as r:
        text = await r.text()
        if r.status != 200:
            raise StepError(f"preload {model}: HTTP {r.status}: {text[:200]}")


def tagged(model: str) -> str:
    """A model's name as /api/tags lists it: `:latest` where no tag is given."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


async def tags(http: Http, timeout: float) -> set[str]:
    """The models on the server's disk (`/api/tags`), by name and by model."""
    return await _models(http, "/api/tags", timeout)


async def loaded(http: Http, timeout: float) -> set[str]:
    """The models loaded now (`/api/ps`), by name and by model."""
    return await _models(http, "/api/ps", timeout)


async def _models(http: Http, path: str, timeout: float) -> set[str]:
    async with http.session.get(
        f"{http.base}{path}", timeout=aiohttp.ClientTimeout(total=timeout)
    ) as r:
        if r.status != 200:
            raise StepError(f"{path}: HTTP {r.status}")
        data = await r.json()
    models = data.get("models", [])
    return {str(m.get("name")) for m in models} | {str(m.get("model")) for m in models}
