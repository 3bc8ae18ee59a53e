"""The gateway: one OpenAI-compatible endpoint in front of every model.

It runs inside the daemon's event loop, so nothing here blocks: bodies are relayed
chunk by chunk as they arrive, and large request bodies are parsed in a worker
thread. The daemon supplies a `Registry` (which names exist, and a READY server
for a name); the gateway only routes, authenticates, streams and counts.

Errors always have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
`/health` needs no key. `/metrics` needs the key when keys are configured: it names
every model and their states, which `/v1/models` also guards, and Prometheus can
send a bearer token (`authorization: {credentials_file: ...}` in the scrape config).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.registry import Collector
from yarl import URL

from llmsup.errors import ApiError, ModelNotReady, ModelUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """One served name and the server behind it, as the daemon sees it now."""

    served_name: str  # the name clients send as "model"
    unit: str  # the server (process) that serves it
    backend: str  # "vllm" | "ollama" | "command"
    base_url: str  # e.g. "http://127.0.0.1:8000"; the request path (/v1/...) is appended
    api_key: str | None  # sent upstream as "Authorization: Bearer ..."
    state: str  # "READY", "STARTING", "LOADING", "BACKOFF", "FAILED", "STOPPED", ...
    reason: str  # why FAILED / what it is doing
    on_demand: bool


class Registry(Protocol):
    """What the daemon gives the gateway. Every method runs on the event loop."""

    def routes(self) -> list[Route]:
        """Every served name (aliases are the gateway's own, from its config). Called
        per request: keep it cheap."""
        ...

    async def acquire(self, served_name: str, wait: float) -> Route:
        """A READY route. An on-demand model is started (maybe swapping another out)
        and waited for up to `wait` s. Raises ModelNotReady while starting, ModelUnavailable
        when FAILED or stopped. May be cancelled (the client went away): a start it
        began should go on regardless."""
        ...

    def release(self, route: Route) -> None:
        """The request that acquired `route` is over (called exactly once per acquire)."""
        ...


@dataclass(frozen=True)
class GatewayConfig:
    api_keys: Sequence[str] = ()  # resolved keys; empty = no authentication
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> served name
    max_body_bytes: int = 8 * 1024 * 1024
    start_wait: float = 120.0  # how long a request waits for an on-demand start
    connect_timeout: float = 10.0
    # Until the response headers: a non-streamed completion sends them only when done.
    first_byte_timeout: float = 900.0
    read_timeout: float = 300.0  # between two chunks of a response body
    extra_collector: Collector | None = None  # the daemon's per-model metrics
    # Client connections: beyond the cap a new one gets 503 and is closed at once, so
    # a flood cannot take the descriptors supervision needs (see llmsup.limits).
    max_connections: int = 1000
    header_timeout: float = 60.0  # from a request's first byte to the end of its headers
    body_timeout: float = 60.0  # to read a whole request body
    keepalive_timeout: float = 75.0  # an idle connection between two requests


# Headers that belong to one connection (RFC 9110 7.6.1), plus those we set ourselves.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te"}
    | {"trailer", "trailers", "transfer-encoding", "upgrade", "expect"}
)
_NOT_UPSTREAM = _HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key"}
_NOT_DOWNSTREAM = _HOP_BY_HOP | {"content-length", "date", "server"}
_THREAD_PARSE_BYTES = 256 * 1024  # json.loads of more than this would stall the loop
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _response(e: ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers)


class _Metrics:
    def __init__(self, extra: Collector | None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llmsup_gateway_requests", "Requests by model and status", ["model", "code"], registry=r
        )
        self.in_flight = Gauge(
            "llmsup_gateway_in_flight", "Requests being served", ["model"], registry=r
        )
        self.latency = Histogram(
            "llmsup_gateway_upstream_latency_seconds",
            "Time from forwarding a request to the upstream's response headers",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.connections = Gauge(
            "llmsup_gateway_connections", "Client connections open", registry=r
        )
        self.dropped = Counter(
            "llmsup_gateway_connections_dropped",
            "Client connections refused (over max_connections) or timed out",
            ["reason"],
            registry=r,
        )
        if extra is not None:
            r.register(extra)


_GATEWAY: web.AppKey[_Gateway] = web.AppKey("llmsup_gateway")


def create_app(registry: Registry, config: GatewayConfig) -> web.Application:
    """The gateway's aiohttp application; run it with `serve`."""
    gw = _Gateway(registry, config)
    # client_max_size enforces the limit while reading bodies without Content-Length.
    app = web.Application(
        middlewares=[_busy_while_handled, gw.errors_and_auth],
        client_max_size=config.max_body_bytes,
    )
    app[_GATEWAY] = gw
    app.cleanup_ctx.append(gw.client_session)
    app.router.add_get("/health", gw.health)
    app.router.add_get("/metrics", gw.metrics)
    app.router.add_get("/v1/models", gw.models)
    app.router.add_get("/v1/models/{model:.+}", gw.model)
    app.router.add_post("/v1/{tail:.+}", gw.proxy)
    return app


class Listening:
    """The gateway, listening: `addresses`, and `cleanup()` to stop it."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server) -> None:
        self.runner = runner
        self.server = server

    @property
    def addresses(self) -> list[Any]:
        return [sock.getsockname() for sock in self.server.sockets]

    async def cleanup(self) -> None:
        self.server.close()  # no new connections
        await self.runner.cleanup()  # the open ones: finish, then close


async def serve(app: web.Application, host: str, port: int) -> Listening:
    """Listen on host:port; stop with `await listening.cleanup()`."""
    gw = app[_GATEWAY]
    cfg = gw.config
    # handler_cancellation: a client that disconnects cancels its handler at once,
    # which closes the upstream request even while no chunk is flowing.
    # aiohttp's own keep-alive timer (which also runs from a connection's opening) is
    # only a backstop, set later than ours.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=5.0,
        keepalive_timeout=cfg.keepalive_timeout + cfg.header_timeout,
    )
    await runner.setup()
    assert runner.server is not None
    # aiohttp's server has no header timeout and no connection cap: each connection's
    # protocol is wrapped in a _Guarded that adds both.
    guard = _Guard(runner.server, cfg, gw.m)
    try:
        server = await asyncio.get_running_loop().create_server(
            guard.protocol, host, port, reuse_address=True
        )
    except BaseException:
        await runner.cleanup()
        raise
    return Listening(runner, server)


def _raw_response(err: ApiError) -> bytes:
    """A whole HTTP/1.1 answer, for a connection aiohttp never handles (or no longer)."""
    body = json.dumps(err.body()).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}.get(err.status, "Error")
    head = [f"HTTP/1.1 {err.status} {reason}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in err.headers.items()]
    head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(head).encode() + body


class _Guard:
    """Counts the gateway's client connections and refuses those over the cap."""

    def __init__(
        self, factory: Callable[[], asyncio.Protocol], config: GatewayConfig, m: _Metrics
    ) -> None:
        self.factory = factory
        self.config = config
        self.m = m
        self.open = 0
        full = f"The gateway is at its limit of {config.max_connections} connections"
        self.full = _raw_response(
            ApiError(503, full, "server_error", "too_many_connections", {"Retry-After": "1"})
        )
        late = f"Request headers did not arrive within {config.header_timeout:g}s"
        self.late = _raw_response(ApiError(408, late, "invalid_request_error", "request_timeout"))

    def protocol(self) -> asyncio.Protocol:
        return _Guarded(self)


class _Guarded(asyncio.Protocol):
    """One client connection: aiohttp's protocol, behind the cap and two timers.

    From its first byte, a request has `header_timeout` to complete its headers (then
    408, as nginx answers); a new connection has as long to send that first byte,
    and one between two requests `keepalive_timeout` (then a quiet close). While a
    request is handled (see `_busy_while_handled`) no timer runs: the body has its
    own, and a response may stream for as long as the model writes."""

    def __init__(self, guard: _Guard) -> None:
        self.guard = guard
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False  # a request is being handled
        self.pending = False  # part of the next request has arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        g = self.guard
        if g.open >= g.config.max_connections:
            g.m.dropped.labels("max_connections").inc()
            transport.write(g.full)
            transport.close()
            return
        g.open += 1
        g.m.connections.inc()
        self.inner = g.factory()
        self._arm(g.config.header_timeout)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if not self.busy and not self.pending:  # the first byte of a request
            self.pending = True
            self._arm(self.guard.config.header_timeout)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.inner is not None:
            self.guard.open -= 1
            self.guard.m.connections.dec()
            inner, self.inner = self.inner, None
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # -- called around each request by _busy_while_handled

    def request_started(self) -> None:
        self.busy, self.pending = True, False
        self._disarm()

    def request_done(self) -> None:
        self.busy = False
        self._arm(self.guard.config.keepalive_timeout)

    # -- the timer

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expired, seconds)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self, seconds: float) -> None:
        self.timer = None
        t = self.transport
        if self.busy or t is None or t.is_closing():
            return
        if t.get_write_buffer_size():  # the last response is still on its way out
            self._arm(seconds)
            return
        if self.pending:  # a request began and its headers never ended: say so
            self.guard.m.dropped.labels("header_timeout").inc()
            t.write(self.guard.late)
        else:
            self.guard.m.dropped.labels("idle_timeout").inc()
        t.close()


@web.middleware
async def _busy_while_handled(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Tell the connection's guard that a request is being handled (its headers
    arrived), and when it is over."""
    conn = request.transport.get_protocol() if request.transport is not None else None
    if not isinstance(conn, _Guarded):
        return await handler(request)
    conn.request_started()
    try:
        return await handler(request)
    finally:
        conn.request_done()


def _bearer(headers: CIMultiDictProxy[str]) -> str | None:
    auth = headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")


class _Gateway:
    def __init__(self, registry: Registry, config: GatewayConfig) -> None:
        self.registry = registry
        self.config = config
        self.keys = [k.encode("utf-8", "surrogatepass") for k in config.api_keys]
        self.m = _Metrics(config.extra_collector)
        self.session: aiohttp.ClientSession | None = None
        self.created = int(time.time())

    async def client_session(self, app: web.Application) -> AsyncIterator[None]:
        # One pooled session: connections to the backends stay open between requests,
        # idle for less than uvicorn's 5 s, so we never pick one vLLM is closing.
        # auto_decompress=False relays compressed bodies as they are, with their headers.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        yield
        await self.session.close()

    # -- middleware

    def authorized(self, request: web.Request) -> bool:
        if not self.keys:
            return True
        given = (_bearer(request.headers) or "").encode("utf-8", "surrogatepass")
        if not given:
            return False
        ok = False
        for key in self.keys:  # every key, so the time does not tell which one matched
            ok |= hmac.compare_digest(given, key)
        return ok

    @web.middleware
    async def errors_and_auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            if request.path != "/health" and not self.authorized(request):
                raise _unauthorized()
            return await handler(request)
        except ApiError as e:
            return _response(e)
        except web.HTTPException as e:  # from the router and the body reader
            if e.status < 400:
                raise
            codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
            headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}
            message = f"{e.reason}: {request.method} {request.path}"
            if e.status == 413:
                message = f"Request body larger than {self.config.max_body_bytes} bytes"
            code = codes.get(e.status, "invalid_request")
            return _response(ApiError(e.status, message, "invalid_request_error", code, headers))
        except Exception:
            log.exception("gateway: %s %s failed", request.method, request.path)
            error = ApiError(500, "Internal error in the gateway", "server_error", "internal_error")
            return _response(error)

    # -- small endpoints

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.m.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def cards(self) -> dict[str, dict[str, Any]]:
        routes = {r.served_name: r for r in self.registry.routes()}
        names = [(n, n) for n in routes] + sorted(self.config.aliases.items())
        out: dict[str, dict[str, Any]] = {}
        for name, target in names:
            r = routes.get(target)
            if r is None or name in out:
                continue
            info: dict[str, Any] = {"state": r.state, "unit": r.unit, "backend": r.backend}
            info["on_demand"] = r.on_demand
            if name != target:
                info["alias_of"] = target
            out[name] = {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "llmsup",
                "llmsup": info,
            }
        return out

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": list(self.cards().values())})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        card = self.cards().get(name)
        if card is None:
            raise self.not_found(name)
        return web.json_response(card)

    def not_found(self, name: str) -> ApiError:
        known = sorted(self.cards())
        message = f"The model `{name}` does not exist. Available models: {', '.join(known)}"
        return ApiError(404, message, "invalid_request_error", "model_not_found")

    # -- the proxy

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        label, code = "", 500  # label: only known names, so clients cannot grow the series
        try:
            if any(seg in (".", "..") for seg in request.path.split("/")):
                raise web.HTTPNotFound()
            body, obj = await self.read_json(request)
            name = obj.get("model")
            if not isinstance(name, str) or not name:
                raise _bad("`model` must be a non-empty string")
            served = self.config.aliases.get(name, name)
            if not any(r.served_name == served for r in self.registry.routes()):
                raise self.not_found(name)
            label = served
            if served != name:  # the backend knows only its served name
                obj["model"] = served
                body = await _off_loop(len(body), lambda: json.dumps(obj).encode())
            try:
                route = await self.registry.acquire(served, self.config.start_wait)
            except ModelNotReady as e:
                message = f"Model `{name}` is not ready yet: {e.reason}"
                retry = {"Retry-After": str(max(1, e.retry_after))}
                raise ApiError(503, message, "server_error", "model_not_ready", retry) from None
            except ModelUnavailable as e:
                if e.stopped:  # said to an API client: no shell command to run
                    message = f"Model `{name}` is stopped and is not accepting requests"
                    raise ApiError(503, message, "server_error", "model_stopped") from None
                message = f"Model `{name}` is unavailable: {e.reason}"
                raise ApiError(503, message, "server_error", "model_unavailable") from None
            in_flight = self.m.in_flight.labels(served)
            in_flight.inc()
            try:
                response, code = await self.forward(request, route, body, obj.get("stream") is True)
                return response
            finally:
                in_flight.dec()
                self.registry.release(route)
        except (ApiError, web.HTTPException) as e:
            code = e.status
            raise
        except asyncio.CancelledError:
            code = 499  # the client went away (nginx's code for it)
            raise
        finally:
            self.m.requests.labels(label, str(code)).inc()

    async def read_json(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(self.config.max_body_bytes, length)
        try:
            body = await asyncio.wait_for(request.read(), self.config.body_timeout)
        except asyncio.TimeoutError:
            message = f"Request body did not arrive within {self.config.body_timeout:g}s"
            raise ApiError(408, message, "invalid_request_error", "request_timeout") from None
        try:
            obj = await _off_loop(len(body), lambda: json.loads(body))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise _bad(f"Request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise _bad("Request body must be a JSON object")
        return body, obj

    async def forward(
        self, request: web.Request, route: Route, body: bytes, wants_stream: bool
    ) -> tuple[web.StreamResponse, int]:
        assert self.session is not None
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _NOT_UPSTREAM
        )
        headers.setdefault("Content-Type", "application/json")  # checked: it is JSON
        if route.api_key:
            headers["Authorization"] = f"Bearer {route.api_key}"
        cfg = self.config
        # sock_read covers the wait for headers; it is shortened to read_timeout below.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.first_byte_timeout
        )
        url = URL(route.base_url).join(request.rel_url)
        started = time.monotonic()
        try:
            upstream = await self.session.request(
                request.method, url, data=body, headers=headers, timeout=timeout
            )
        except asyncio.TimeoutError:
            message = f"`{route.served_name}` ({route.unit}) did not answer in time"
            raise ApiError(504, message, "server_error", "upstream_timeout") from None
        except aiohttp.ClientError as e:
            message = f"Cannot reach `{route.served_name}` ({route.unit}): {e}"
            raise ApiError(502, message, "server_error", "upstream_unreachable") from None
        self.m.latency.labels(route.served_name).observe(time.monotonic() - started)
        try:
            return await self.relay(request, upstream, wants_stream)
        finally:
            if upstream.content.is_eof():
                upstream.release()  # back to the pool, kept alive
            else:
                upstream.close()  # unfinished: the backend sees the connection close

    async def relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, wants_stream: bool
    ) -> tuple[web.StreamResponse, int]:
        headers = CIMultiDict(
            (k, v) for k, v in upstream.headers.items() if k.lower() not in _NOT_DOWNSTREAM
        )
        if upstream.connection is not None and upstream.connection.protocol is not None:
            upstream.connection.protocol.read_timeout = self.config.read_timeout
        ctype = upstream.headers.get("Content-Type", "")
        streaming = ctype.startswith("text/event-stream") or upstream.content_length is None
        if not (streaming or wants_stream):
            # A complete JSON answer: one write of headers and body (a StreamResponse
            # sends its headers apart, a second syscall per request).
            try:
                body = await upstream.read()
            except asyncio.TimeoutError:  # aiohttp's ServerTimeoutError too
                message = f"Upstream stopped sending mid-response for {self.config.read_timeout:g}s"
                raise ApiError(504, message, "server_error", "upstream_timeout") from None
            except aiohttp.ClientError as e:
                message = f"Upstream failed mid-response: {e!r}"
                raise ApiError(502, message, "server_error", "upstream_failed") from None
            return web.Response(status=upstream.status, body=body, headers=headers), upstream.status
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"  # an nginx in front must not buffer either
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        await resp.prepare(request)
        tail = b"\n\n"  # the end of what was relayed: is an event left half-written?
        while True:
            try:
                chunk = await upstream.content.readany()  # what has arrived; no waiting for more
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("gateway: upstream failed mid-stream: %r", e)
                await self._error_event(resp, ctype, tail, e)
                # Headers are sent: cutting the connection (no [DONE], no last chunk) is
                # what tells any client that the answer is incomplete.
                if request.transport is not None:
                    request.transport.close()
                return resp, 502
            if not chunk:
                return resp, upstream.status
            tail = (tail + chunk)[-2:]
            try:
                await resp.write(chunk)
            except ConnectionError:  # the client went away
                return resp, 499

    @staticmethod
    async def _error_event(
        resp: web.StreamResponse, ctype: str, tail: bytes, e: BaseException
    ) -> None:
        """An SSE stream gets a last event in OpenAI's error shape (as vLLM sends
        for a failure mid-stream), which OpenAI's client libraries raise as an error."""
        if not ctype.startswith("text/event-stream"):
            return
        err = ApiError(502, f"Upstream failed mid-stream: {e!r}", "server_error", "upstream_failed")
        event = b"data: " + json.dumps(err.body()).encode() + b"\n\n"
        with contextlib.suppress(ConnectionError):
            await resp.write(event if tail.endswith(b"\n\n") else b"\n\n" + event)


def _unauthorized() -> ApiError:
    message = "Missing or invalid API key"
    bearer = {"WWW-Authenticate": "Bearer"}
    return ApiError(401, message, "invalid_request_error", "invalid_api_key", bearer)


def _bad(message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "invalid_request")


async def _off_loop(size: int, work: Callable[[], Any]) -> Any:
    """Run `work` here if `size` is small, else in a thread so the loop keeps ticking."""
    if size <= _THREAD_PARSE_BYTES:
        return work()
    return await asyncio.to_thread(work)
