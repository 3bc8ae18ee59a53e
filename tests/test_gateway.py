"""The gateway against real fake vLLM servers, over real HTTP.

Each test runs the gateway app in its own event loop (`asyncio.run`) with a stub
Registry that maps served names to fake servers started once for the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDictProxy
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from llmsup.errors import ModelNotReady, ModelUnavailable
from llmsup.gateway.app import create_app, serve
from llmsup.gateway.config import GatewayConfig
from llmsup.gateway.routing import Route
from llmsup.gateway.upstream import Failure
from tests.util import FAKES_DIR, fake_env, free_port, wait_for

UPSTREAM_KEY = "upstream-key-123"
ALIASES = {"gpt-4o": "alpha", "emb": "alpha"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


# ------------------------------------------------------------------ fakes


@dataclass
class Fake:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Fake]]:
    logs = tmp_path_factory.mktemp("fakes")
    specs: dict[str, dict[str, object]] = {
        "alpha": {"FAKE_TOKEN_DELAY": 0},
        "beta": {"FAKE_TOKEN_DELAY": 0, "VLLM_API_KEY": UPSTREAM_KEY},
        "slow": {"FAKE_TOKEN_DELAY": 0.1},
    }
    started: dict[str, Fake] = {}
    argv = [str(FAKES_DIR / "vllm"), "serve", "--host", "127.0.0.1"]
    try:
        for name, env in specs.items():
            port = free_port()
            with open(logs / f"{name}.log", "wb") as out:
                proc = subprocess.Popen(
                    [*argv, f"org/{name}", "--port", str(port), "--served-model-name", name],
                    env=fake_env(FAKE_LOAD_TIME=0.1, **env),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started[name] = Fake(proc, port, logs / f"{name}.log")
        for name, fake in started.items():
            wait_for(partial(_healthy, fake.port), 15, message=f"fake {name} not ready")
        yield started
    finally:
        for fake in started.values():
            os.killpg(fake.proc.pid, signal.SIGTERM)
        for fake in started.values():
            try:
                fake.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(fake.proc.pid, signal.SIGKILL)
                fake.proc.wait()


# ------------------------------------------------------------------ stub registry


class StubRegistry:
    """Serves READY routes; answers for the others as the daemon would."""

    def __init__(self, routes: list[Route]) -> None:
        self.table = {r.served_name: r for r in routes}
        self.acquired: list[tuple[str, float]] = []
        self.released: list[str] = []

    def routes(self) -> list[Route]:
        return list(self.table.values())

    async def acquire(self, served_name: str, wait: float) -> Route:
        route = self.table[served_name]
        if route.unit == "boom":
            raise RuntimeError("registry bug")
        if route.state == "FAILED" or (route.state == "STOPPED" and not route.on_demand):
            raise ModelUnavailable(route.reason)
        if route.state != "READY":
            raise ModelNotReady(route.reason or "starting", 5)
        self.acquired.append((served_name, wait))
        return route

    def release(self, route: Route) -> None:
        self.released.append(route.served_name)

    def failed(self, route: Route, failure: Failure, error: str) -> None:
        pass  # local servers only: nothing to count

    def another(self, route: Route) -> Route | None:
        return None


def stub(fakes: dict[str, Fake], **extra_urls: str) -> StubRegistry:
    def ready(name: str, url: str, key: str | None = None) -> Route:
        return Route(name, f"{name}-unit", "vllm", url, key, "READY", "", False)

    routes = [
        ready("alpha", fakes["alpha"].url),
        ready("beta", fakes["beta"].url, UPSTREAM_KEY),
        ready("beta-nokey", fakes["beta"].url),
        ready("slow", fakes["slow"].url),
        Route(
            "big", "big", "vllm", "http://127.0.0.1:9", None, "LOADING", "loading weights", False
        ),
        Route(
            "broken", "broken", "vllm", "http://127.0.0.1:9", None, "FAILED", "exit 1: OOM", False
        ),
        Route("lazy", "lazy", "ollama", "http://127.0.0.1:9", None, "STOPPED", "", True),
        Route("boom", "boom", "command", "http://127.0.0.1:9", None, "READY", "", False),
    ]
    routes += [ready(name, url) for name, url in extra_urls.items()]
    return StubRegistry(routes)


# ------------------------------------------------------------------ harness


@asynccontextmanager
async def gateway(
    registry: StubRegistry, ports: list[int] | None = None, **config: Any
) -> AsyncIterator[aiohttp.ClientSession]:
    """The gateway on a free port, and a client for it (`ports` receives the port)."""
    app = create_app(registry, GatewayConfig(aliases=ALIASES, **config))
    runner = await serve(app, "127.0.0.1", 0)
    try:
        port = runner.addresses[0][1]
        if ports is not None:
            ports.append(port)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            yield client
    finally:
        await runner.cleanup()


# A client deadline far above the gateway timeouts the tests configure (0.5 s) and
# far below the defaults (minutes): an answer before it shows the configured one applied.
CONFIGURED_TIMEOUT_APPLIES = aiohttp.ClientTimeout(total=60)


async def call(
    client: aiohttp.ClientSession, path: str, body: Any = None, method: str = "POST", **kw: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    if body is not None and "data" not in kw:
        kw["json"] = body
    async with client.request(method, path, **kw) as r:
        text = await r.text()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return r.status, payload, r.headers


def error(payload: Any) -> dict[str, Any]:
    """The OpenAI error object, asserting the shape."""
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    err: dict[str, Any] = payload["error"]
    assert {"message", "type", "code"} <= set(err) and isinstance(err["message"], str), err
    return err


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


async def scrape(client: aiohttp.ClientSession, url: str, **kw: Any) -> dict[str, float]:
    """Prometheus samples as {'name{k=v,...}': value}."""
    async with client.get(url, **kw) as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


# ------------------------------------------------------------------ routing


def test_routes_by_served_name_and_alias(fakes: dict[str, Fake]) -> None:
    async def body() -> None:
        reg = stub(fakes)
        async with gateway(reg, start_wait=42.0) as c:
            status, out, _ = await call(c, "/v1/chat/completions", {**CHAT, "model": "alpha"})
            assert status == 200 and out["model"] == "alpha", out
            # The fake answers 404 for a name it does not serve: a 200 means the
            # gateway rewrote the alias to the served name.
            status, out, _ = await call(c, "/v1/chat/completions", {**CHAT, "model": "gpt-4o"})
            assert status == 200 and out["model"] == "alpha", out
            status, out, _ = await call(
                c, "/v1/completions?x=1", {"model": "gpt-4o", "prompt": "a"}
            )
            assert status == 200 and out["object"] == "text_completion", out
            status, out, _ = await call(c, "/v1/embeddings", {"model": "emb", "input": "hello"})
            assert status == 200 and out["data"][0]["object"] == "embedding", out
            # 400 KB: parsed and rewritten in a worker thread, off the event loop.
            big = {"model": "gpt-4o", "prompt": "word " * 80_000, "max_tokens": 1}
            status, out, _ = await call(c, "/v1/completions", big)
            assert status == 200 and out["usage"]["prompt_tokens"] == 80_000, out
            async with aiohttp.ClientSession() as direct:  # the check above is meaningful
                status, _, _ = await call(
                    direct,
                    fakes["alpha"].url + "/v1/completions",
                    {"model": "gpt-4o", "prompt": "a"},
                )
                assert status == 404
        assert reg.acquired == [("alpha", 42.0)] * 5
        assert reg.released == ["alpha"] * 5

    asyncio.run(body())


def test_upstream_key_is_added_and_client_key_is_not_forwarded(fakes: dict[str, Fake]) -> None:
    async def body() -> None:
        # The client's key is the backend's too: forwarding it would let it through.
        async with gateway(stub(fakes), api_keys=[UPSTREAM_KEY]) as c:
            auth = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
            status, out, _ = await call(
                c, "/v1/chat/completions", {**CHAT, "model": "beta"}, headers=auth
            )
            assert status == 200 and out["model"] == "beta", out
            # Same server, no key in the route: the fake refuses, so the client's own
            # Authorization header did not reach it.
            status, out, _ = await call(
                c, "/v1/chat/completions", {**CHAT, "model": "beta-nokey"}, headers=auth
            )
            assert status == 401 and out == {"error": "Unauthorized"}, out

    asyncio.run(body())


# ------------------------------------------------------------------ streaming


def test_stream_arrives_chunk_by_chunk(fakes: dict[str, Fake]) -> None:
    async def body() -> None:
        async with gateway(stub(fakes)) as c:
            req = {**CHAT, "model": "slow", "max_tokens": 5, "stream": True}
            stamps: list[float] = []
            events: list[bytes] = []
            async with c.post("/v1/chat/completions", json=req) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/event-stream")
                assert r.headers["X-Accel-Buffering"] == "no"
                assert r.headers["Cache-Control"] == "no-cache"
                async for chunk in r.content.iter_any():
                    new = [e for e in chunk.split(b"\n\n") if e.startswith(b"data:")]
                    stamps += [time.monotonic()] * len(new)
                    events += new
            assert events[-1] == b"data: [DONE]"
            assert len(events) == 7  # role, 5 tokens, [DONE]
            # 5 tokens 0.1 s apart: buffering would deliver them all at once.
            assert stamps[-1] - stamps[0] >= 0.3, stamps

    asyncio.run(body())


def test_client_disconnect_cancels_the_upstream_request(fakes: dict[str, Fake]) -> None:
    running = "vllm:num_requests_running{engine=0,model_name=slow}"

    async def body() -> None:
        reg = stub(fakes)
        async with gateway(reg) as c, aiohttp.ClientSession() as probe:
            fake_metrics = fakes["slow"].url + "/metrics"
            # 300 tokens at 0.1 s: the fake would stream for 30 s if nobody cancelled it.
            req = {**CHAT, "model": "slow", "max_tokens": 300, "stream": True}
            r = await c.post("/v1/chat/completions", json=req)
            await r.content.readuntil(b"\n\n")
            await r.content.readuntil(b"\n\n")
            assert (await scrape(probe, fake_metrics))[running] == 1
            r.close()  # the client goes away mid-stream

            async def upstream_idle() -> bool:
                return (await scrape(probe, fake_metrics))[running] == 0

            await until(upstream_idle, 3.0, "the fake still generating")
            assert reg.released == ["slow"]
            m = await scrape(c, "/metrics")
            assert m["llmsup_gateway_in_flight{model=slow}"] == 0
            assert m["llmsup_gateway_requests_total{code=499,model=slow}"] == 1

    asyncio.run(body())


# ------------------------------------------------------------------ errors


def test_unknown_starting_failed_and_broken_models(fakes: dict[str, Fake]) -> None:
    async def body() -> None:
        reg = stub(fakes)
        async with gateway(reg) as c:
            status, out, _ = await call(c, "/v1/chat/completions", {**CHAT, "model": "nope"})
            err = error(out)
            assert status == 404 and err["code"] == "model_not_found"
            assert "`nope`" in err["message"]
            assert all(n in err["message"] for n in ("alpha", "slow", "gpt-4o", "lazy"))

            for name in ("big", "lazy"):  # loading; on-demand and stopped (starting now)
                status, out, headers = await call(c, "/v1/completions", {"model": name})
                assert status == 503 and headers["Retry-After"] == "5", out
                err = error(out)
                assert err["code"] == "model_not_ready"
                assert name != "big" or "loading weights" in err["message"]

            status, out, headers = await call(c, "/v1/completions", {"model": "broken"})
            err = error(out)
            assert status == 503 and "Retry-After" not in headers
            assert err["code"] == "model_unavailable" and "exit 1: OOM" in err["message"]

            status, out, _ = await call(c, "/v1/completions", {"model": "boom"})
            assert status == 500 and error(out)["code"] == "internal_error"
            status, _, _ = await call(c, "/v1/completions", {"model": "alpha", "prompt": "x"})
            assert status == 200  # still serving after an internal error
        assert reg.released == ["alpha"]

    asyncio.run(body())


def test_bad_requests_are_400(fakes: dict[str, Fake]) -> None:
    async def body() -> None:
        async with gateway(stub(fakes)) as c:
            for data in (b"{not json", b"", b"[1, 2]", b'"alpha"', b"\xff\xfe", b"[" * 100_000):
                status, out, _ = await call(c, "/v1/chat/completions", data=data)
                assert status == 400 and error(out)["type"] == "invalid_request_error", data[:20]
            for req in ({}, {"model": 42}, {"model": None}, {"model": ""}, {"model": ["alpha"]}):
                status, out, _ = await call(c, "/v1/chat/completions", req)
                assert status == 400 and "model" in error(out)["message"], req

    asyncio.run(body())


def test_api_keys(fakes: dict[str, Fake]) -> None:
    async def body() -> None:
        async with gateway(stub(fakes), api_keys=["k1", "k2"]) as c:
            req = {"model": "alpha", "prompt": "x", "max_tokens": 1}
            refused = [
                {"Authorization": "Bearer nope"},
                {"x-api-key": "k3"},
                {"Authorization": "Bearer"},
            ]
            for headers in [{}, {"Authorization": "Basic k1"}, *refused]:
                status, out, h = await call(c, "/v1/completions", req, headers=headers)
                assert status == 401 and error(out)["code"] == "invalid_api_key", headers
                assert h["WWW-Authenticate"] == "Bearer"
            accepted = [{"Authorization": "Bearer k2"}, {"authorization": "bearer k1"}]
            for headers in [*accepted, {"x-api-key": "k1"}]:
                status, out, _ = await call(c, "/v1/completions", req, headers=headers)
                assert status == 200, (headers, out)
            assert (await call(c, "/v1/models", method="GET"))[0] == 401
            assert (await call(c, "/metrics", method="GET"))[0] == 401
            status, out, _ = await call(c, "/health", method="GET")
            assert status == 200 and out == {"status": "ok"}

    asyncio.run(body())


def test_body_too_large_is_413(fakes: dict[str, Fake]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "alpha", "prompt": "'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"}'

    async def body() -> None:
        async with gateway(stub(fakes), max_body_bytes=16 * 1024) as c:
            big = {"model": "alpha", "prompt": "x" * 20_000}
            status, out, _ = await call(c, "/v1/completions", big)  # Content-Length
            assert status == 413 and error(out)["code"] == "request_too_large"
            status, out, _ = await call(c, "/v1/completions", data=chunks())  # chunked
            assert status == 413 and error(out)["code"] == "request_too_large"
            ok = {"model": "alpha", "prompt": "x" * 10_000, "max_tokens": 1}
            assert (await call(c, "/v1/completions", ok))[0] == 200

    asyncio.run(body())


def test_unreachable_upstream_is_502_and_silent_one_504(fakes: dict[str, Fake]) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):  # read until the gateway gives up; never answer
            pass
        writer.close()

    async def body() -> None:
        hung = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = hung.sockets[0].getsockname()[1]
        closed = f"http://127.0.0.1:{free_port()}"
        reg = stub(fakes, gone=closed, hung=f"http://127.0.0.1:{port}")
        try:
            async with gateway(reg, first_byte_timeout=0.5) as c:
                status, out, _ = await call(c, "/v1/completions", {"model": "gone"})
                assert status == 502 and error(out)["code"] == "upstream_unreachable"
                assert "gone-unit" in error(out)["message"]
                # The configured 0.5 s applies, not a default of minutes: a deadline for
                # the answer, not a timing assert (a gateway that waited on fails here).
                status, out, _ = await call(
                    c, "/v1/completions", {"model": "hung"}, timeout=CONFIGURED_TIMEOUT_APPLIES
                )
                assert status == 504 and error(out)["code"] == "upstream_timeout"
        finally:
            hung.close()
            await hung.wait_closed()
        assert sorted(reg.released) == ["gone", "hung"]

    asyncio.run(body())


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request with a Content-Length body, as the gateway sends it: its head."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return head


def test_upstream_stalling_after_its_headers_is_504_and_one_dying_is_502(
    fakes: dict[str, Fake],
) -> None:
    async def headers_then(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b'Content-Length: 100\r\n\r\n{"id":')
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b' "cmpl-1",')  # body bytes flow, then stop: read_timeout applies
        await writer.drain()
        if b"dies" in head:
            writer.close()
            return
        with contextlib.suppress(ConnectionError):
            while await reader.read(1 << 16):  # stall until the gateway gives up
                pass
        writer.close()

    async def body() -> None:
        server = await asyncio.start_server(headers_then, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        reg = stub(fakes, stalls=url)
        try:
            async with gateway(reg, read_timeout=0.5) as c:
                status, out, _ = await call(
                    c, "/v1/completions", {"model": "stalls"}, timeout=CONFIGURED_TIMEOUT_APPLIES
                )
                assert status == 504 and error(out)["code"] == "upstream_timeout"
                assert "mid-response for 0.5s" in error(out)["message"]
                status, out, _ = await call(c, "/v1/completions?dies=1", {"model": "stalls"})
                assert status == 502 and error(out)["code"] == "upstream_failed"
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(body())


def test_upstream_connections_are_kept_alive(fakes: dict[str, Fake]) -> None:
    def client_ports() -> list[str]:
        # The fake's access log: '... INFO:     127.0.0.1:PORT - "POST /v1/completions?n=..." 200'
        lines = fakes["alpha"].log.read_text().splitlines()
        return [ln.split("127.0.0.1:")[1].split()[0] for ln in lines if "?n=" in ln]

    async def body() -> None:
        async with gateway(stub(fakes)) as c:
            for n in range(4):
                req = {"model": "alpha", "prompt": "x", "max_tokens": 1}
                assert (await call(c, f"/v1/completions?n={n}", req))[0] == 200

    asyncio.run(body())
    wait_for(lambda: len(client_ports()) == 4, message="access log lines")
    assert len(set(client_ports())) == 1, client_ports()  # one pooled connection served all four


def test_upstream_failing_mid_stream_gets_an_error_event_then_a_cut(fakes: dict[str, Fake]) -> None:
    async def one_event_then_die(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        writer.close()  # no terminating chunk: the stream is cut short

    async def body() -> None:
        server = await asyncio.start_server(one_event_then_die, "127.0.0.1", 0)
        reg = stub(fakes, dying=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            async with gateway(reg) as c:
                got = b""
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with c.post("/v1/completions", json={"model": "dying"}) as r:
                        assert r.status == 200
                        async for chunk in r.content.iter_any():
                            got += chunk
                # what arrived was relayed, then an error event in OpenAI's shape, then the cut
                first, last, end = got.split(b"\n\n")
                assert (first, end) == (b"data: 1", b"")
                assert last.startswith(b"data: ")
                err = json.loads(last[len(b"data: ") :])["error"]
                assert (err["type"], err["code"]) == ("server_error", "upstream_failed")
                assert "mid-stream" in err["message"]
                m = await scrape(c, "/metrics")
                assert m["llmsup_gateway_requests_total{code=502,model=dying}"] == 1
        finally:
            server.close()
            await server.wait_closed()
        assert reg.released == ["dying"]

    asyncio.run(body())


def test_unknown_path_404_and_wrong_method_405(fakes: dict[str, Fake]) -> None:
    async def body() -> None:
        ports: list[int] = []
        async with gateway(stub(fakes), ports) as c:
            # A dot segment could reach a backend's non-OpenAI API (Ollama's /api/delete).
            head = b"POST /v1/%2e%2e/api/delete HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n"
            line = await raw_exchange(ports[0], head + b'\r\n{"model":"alpha"}')
            assert line.startswith(b"HTTP/1.1 404 "), line
            for method, path in (("GET", "/nope"), ("POST", "/v2/chat"), ("GET", "/v1/foo")):
                status, out, _ = await call(c, path, method=method)
                assert status in (404, 405) and error(out), (method, path)
            assert (await call(c, "/nope", method="GET"))[0] == 404
            status, out, headers = await call(c, "/v1/chat/completions", method="GET")
            assert status == 405 and error(out)["code"] == "method_not_allowed"
            assert headers["Allow"] == "POST"
            status, out, _ = await call(c, "/v1/models", method="DELETE")
            assert status == 405 and error(out)

    asyncio.run(body())


# ------------------------------------------------------------------ models and metrics


def test_models_list_merges_routes_and_aliases(fakes: dict[str, Fake]) -> None:
    async def body() -> None:
        async with gateway(stub(fakes)) as c:
            status, out, _ = await call(c, "/v1/models", method="GET")
            assert status == 200 and out["object"] == "list"
            cards = {m["id"]: m for m in out["data"]}
            served = ["alpha", "beta", "beta-nokey", "slow", "big", "broken", "lazy", "boom"]
            assert list(cards) == [*served, "emb", "gpt-4o"]
            assert all(m["object"] == "model" and m["owned_by"] == "llmsup" for m in out["data"])
            big = {"state": "LOADING", "unit": "big", "backend": "vllm", "on_demand": False}
            assert cards["big"]["llmsup"] == big
            assert cards["lazy"]["llmsup"]["state"] == "STOPPED"
            assert cards["lazy"]["llmsup"]["on_demand"] is True
            assert cards["gpt-4o"]["llmsup"]["alias_of"] == "alpha"
            assert cards["gpt-4o"]["llmsup"]["state"] == "READY"
            status, out, _ = await call(c, "/v1/models/gpt-4o", method="GET")
            assert status == 200 and out["id"] == "gpt-4o"
            status, out, _ = await call(c, "/v1/models/nope", method="GET")
            assert status == 404 and error(out)["code"] == "model_not_found"

    asyncio.run(body())


class ModelsUp(Collector):
    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("llmsup_model_up", "Model is READY", labels=["model"])
        g.add_metric(["alpha"], 1)
        yield g


def test_metrics_count_requests_and_include_the_daemons_collector(fakes: dict[str, Fake]) -> None:
    async def body() -> None:
        reg = stub(fakes)
        # Two apps at once: each has its own CollectorRegistry.
        async with gateway(reg, extra_collector=ModelsUp()) as c, gateway(reg) as other:
            for _ in range(3):
                await call(
                    c, "/v1/completions", {"model": "gpt-4o", "prompt": "x", "max_tokens": 1}
                )
            await call(c, "/v1/completions", {"model": "nope"})
            await call(c, "/v1/completions", data=b"{")
            await call(c, "/v1/completions", {"model": "big"})
            await call(other, "/v1/completions", {"model": "nope"})
            m = await scrape(c, "/metrics")
            assert m["llmsup_gateway_requests_total{code=200,model=alpha}"] == 3
            assert m["llmsup_gateway_requests_total{code=404,model=}"] == 1
            assert m["llmsup_gateway_requests_total{code=400,model=}"] == 1
            assert m["llmsup_gateway_requests_total{code=503,model=big}"] == 1
            assert m["llmsup_gateway_in_flight{model=alpha}"] == 0
            assert m["llmsup_gateway_upstream_latency_seconds_count{model=alpha}"] == 3
            assert m["llmsup_model_up{model=alpha}"] == 1
            m = await scrape(other, "/metrics")
            assert m["llmsup_gateway_requests_total{code=404,model=}"] == 1
            assert "llmsup_model_up{model=alpha}" not in m

    asyncio.run(body())


# ------------------------------------------------------------------ fuzz


async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await reader.readline()
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


def test_fuzzed_inputs_get_4xx_without_a_hang(fakes: dict[str, Fake]) -> None:
    rng = random.Random(20240611)
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/x/y"]
    weird = ["", " ", "Bearer", "Bearer  ", "bearer k", "Basic azE=", "Bearer k\t", "k", "Bearer é"]

    def junk(n: int) -> bytes:
        return bytes(rng.randrange(256) for _ in range(n))

    def value() -> Any:
        return rng.choice([None, 1, -1.5, True, [], {}, "", "x" * 50, [1, {}], {"a": []}])

    async def one(c: aiohttp.ClientSession, port: int, i: int) -> int | bytes:
        kind = i % 5
        key = {"Authorization": "Bearer k"}
        if kind == 0:  # random bytes
            return (await call(c, rng.choice(paths), data=junk(rng.randrange(600)), headers=key))[0]
        if kind == 1:  # JSON with odd fields
            req = {"model": rng.choice([value(), "no-" + junk(4).hex()]), "stream": value()}
            return (await call(c, rng.choice(paths), req, headers=key))[0]
        if kind == 2:  # a real model, a nonsense request: the backend's own 4xx comes through
            req = {"model": rng.choice(["alpha", "gpt-4o"]), "messages": value(), "prompt": 7}
            req["max_tokens"] = rng.choice([0, -1, "many", 1.5])
            return (await call(c, rng.choice(paths[:2]), req, headers=key))[0]
        if kind == 3:  # weird credentials and headers
            headers = {"Authorization": rng.choice(weird), "Content-Type": junk(3).hex()}
            headers["x-api-key"] = rng.choice(weird)
            return (await call(c, rng.choice(paths), {"model": "alpha"}, headers=headers))[0]
        line = junk(rng.randrange(1, 80)) + b"\r\n\r\n"  # not HTTP at all
        if rng.random() < 0.3:
            line = (
                b"POST /v1/%2e%2e/api/delete HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n"
            )
        return await raw_exchange(port, line)

    async def body() -> None:
        ports: list[int] = []
        async with gateway(stub(fakes), ports, api_keys=["k"], max_body_bytes=4096) as c:
            port = ports[0]
            results = []
            for start in range(0, 200, 20):
                batch = [one(c, port, i) for i in range(start, start + 20)]
                results += await asyncio.wait_for(asyncio.gather(*batch), 20)
            for r in results:
                if isinstance(r, bytes):
                    assert r == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", r), r
                else:
                    assert 400 <= r < 500, results
            assert (await call(c, "/health", method="GET"))[0] == 200

    asyncio.run(body())


# ------------------------------------------------------------------ connections


async def read_all(reader: asyncio.StreamReader, timeout: float = 30) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), timeout)


def raw_json(answer: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_half_sent_headers_and_idle_connections_are_closed(fakes: dict[str, Fake]) -> None:
    async def body() -> None:
        ports: list[int] = []
        limits = {"header_timeout": 0.3, "keepalive_timeout": 0.3, "body_timeout": 0.3}
        async with gateway(stub(fakes), ports, **limits) as c:
            port = ports[0]
            # Headers that never end: 408 in OpenAI's shape, then the close.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
            status, _, out = raw_json(await read_all(reader))
            assert status == 408 and error(out)["code"] == "request_timeout"
            writer.close()
            # A connection that sends nothing at all is closed too.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await read_all(reader) == b""
            writer.close()
            # A body that stops half-way: 408.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b'\r\nContent-Length: 100\r\n\r\n{"model": '
            )
            status, _, out = raw_json(await read_all(reader))
            assert status == 408 and "body" in error(out)["message"]
            writer.close()
            # A complete request is answered, then the idle connection is closed quietly.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await read_all(reader)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1
            writer.close()
            # A response that takes longer than every timeout is not cut.
            req = {**CHAT, "model": "slow", "max_tokens": 8, "stream": True}
            async with c.post("/v1/chat/completions", json=req) as r:
                assert r.status == 200
                assert (await r.read()).rstrip().endswith(b"data: [DONE]")
            samples = await scrape(c, "/metrics")
            dropped = "llmsup_gateway_connections_dropped_total{reason=%s}"
            assert samples[dropped % "header_timeout"] == 1  # the body timeout is not one
            assert samples[dropped % "idle_timeout"] >= 2

    asyncio.run(body())


def test_connections_over_the_cap_get_503_and_the_rest_are_served(
    fakes: dict[str, Fake],
) -> None:
    async def body() -> None:
        ports: list[int] = []
        async with gateway(stub(fakes), ports, max_connections=3) as c:
            port = ports[0]
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            for _, w in held:  # half a request each: they hold their slots
                w.write(b"POST /v1/completions HTTP/1.1\r\n")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            status, headers, out = raw_json(await read_all(reader))
            assert status == 503 and headers["Retry-After"] == "1"
            assert error(out)["code"] == "too_many_connections"
            writer.close()
            _, w = held.pop()
            w.close()

            async def served() -> bool:
                try:
                    status = (await call(c, "/v1/chat/completions", {**CHAT, "model": "alpha"}))[0]
                except aiohttp.ClientError:
                    return False
                return status == 200

            await until(served, 10, "a freed slot is used again")
            for _, w in held:
                w.close()

    asyncio.run(body())


def test_route_is_a_frozen_value() -> None:
    r = Route("a", "u", "vllm", "http://x", None, "READY", "", False)
    assert replace(r, state="FAILED") != r and hash(r) == hash(replace(r))


class _Loopback(AbstractResolver):
    """Resolves every name to 127.0.0.1: only a session built with it reaches the fakes
    under a made-up host name."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        loopback = ResolveResult(
            hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0, flags=0
        )
        return [loopback]

    async def close(self) -> None:
        pass


def test_an_injected_upstream_session_carries_the_requests(fakes: dict[str, Fake]) -> None:
    async def body() -> None:
        url = f"http://alpha.upstream.invalid:{fakes['alpha'].port}"
        route = Route("alpha", "alpha-unit", "vllm", url, None, "READY", "", False)
        seen: list[str] = []

        async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
            seen.append(str(params.url))

        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(on_start)
        connector = aiohttp.TCPConnector(resolver=_Loopback())
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as up:
            app = create_app(StubRegistry([route]), GatewayConfig(), upstream=up)
            runner = await serve(app, "127.0.0.1", 0)
            try:
                port = runner.addresses[0][1]
                async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as c:
                    status, out, _ = await call(
                        c, "/v1/chat/completions", {**CHAT, "model": "alpha"}
                    )
                    assert status == 200 and out["model"] == "alpha", out
            finally:
                await runner.cleanup()
            assert seen == [f"{url}/v1/chat/completions"]
            assert not up.closed  # its owner closes it, not the gateway

        async with aiohttp.ClientSession() as client:
            # Without it, the gateway's own session cannot resolve the made-up name.
            app = create_app(StubRegistry([route]), GatewayConfig())
            runner = await serve(app, "127.0.0.1", 0)
            try:
                port = runner.addresses[0][1]
                status, out, _ = await call(
                    client,
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    {**CHAT, "model": "alpha"},
                )
                assert status == 502 and error(out)["code"] == "upstream_unreachable", out
            finally:
                await runner.cleanup()

    asyncio.run(body())


def test_the_gateway_runs_on_uvloop(fakes: dict[str, Fake]) -> None:
    """The gateway also runs on uvloop (bench/gateway.py compares the two loops): its
    connection guard must not assume asyncio's own transports."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (pip install -e .[dev])")

    async def body() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        async with gateway(stub(fakes)) as c:
            status, out, _ = await call(c, "/v1/chat/completions", {**CHAT, "model": "alpha"})
            assert status == 200 and out["model"] == "alpha", out
            chat = {**CHAT, "model": "slow", "stream": True, "max_tokens": 3}
            status, out, headers = await call(c, "/v1/chat/completions", chat)
            assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
            assert out.rstrip().endswith("data: [DONE]"), out

    uvloop.run(asyncio.wait_for(body(), 60))  # a failure, rather than a hang
