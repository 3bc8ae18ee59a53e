"""The gateway's HTTP application: authentication, routing, relaying, errors.

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
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from llmsup.errors import ApiError, ModelNotReady, ModelUnavailable
from llmsup.gateway.config import GatewayConfig
from llmsup.gateway.connections import Guard, busy_while_handled
from llmsup.gateway.metrics import Metrics
from llmsup.gateway.routing import Registry, Route

log = logging.getLogger(__name__)


# Headers that belong to one connection (RFC 9110 7.6.1), plus those we set ourselves.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te"}
    | {"trailer", "trailers", "transfer-encoding", "upgrade", "expect"}
)
_NOT_UPSTREAM = _HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key"}
_NOT_DOWNSTREAM = _HOP_BY_HOP | {"content-length", "date", "server"}
_THREAD_PARSE_BYTES = 256 * 1024  # json.loads of more than this would stall the loop


def _response(e: ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers)


_GATEWAY: web.AppKey[_Gateway] = web.AppKey("llmsup_gateway")


def create_app(
    registry: Registry, config: GatewayConfig, upstream: aiohttp.ClientSession | None = None
) -> web.Application:
    """The gateway's aiohttp application; run it with `serve`. Requests go upstream
    through `upstream` when given (its owner closes it), else through a pooled
    session of the app's own."""
    gw = _Gateway(registry, config, upstream)
    # client_max_size enforces the limit while reading bodies without Content-Length.
    app = web.Application(
        middlewares=[busy_while_handled, gw.errors_and_auth],
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

    def __init__(self, runner: web.AppRunner, servers: list[asyncio.Server]) -> None:
        self.runner = runner
        self.servers = servers

    @property
    def addresses(self) -> list[Any]:
        return [sock.getsockname() for server in self.servers for sock in server.sockets]

    async def cleanup(self) -> None:
        for server in self.servers:
            server.close()  # no new connections
        await self.runner.cleanup()  # the open ones: finish, then close


async def serve(
    app: web.Application,
    host: str | None = None,
    port: int | None = None,
    socks: list[socket.socket] | None = None,
) -> Listening:
    """Listen on host:port, or on `socks` (bound and listening already: the gateway
    process gets them from the daemon); stop with `await listening.cleanup()`."""
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
    # protocol is wrapped in a Guarded that adds both.
    guard = Guard(runner.server, cfg, gw.m)
    loop = asyncio.get_running_loop()
    try:
        if socks is None:
            assert port is not None
            servers = [await loop.create_server(guard.protocol, host, port, reuse_address=True)]
        else:
            servers = [await loop.create_server(guard.protocol, sock=s) for s in socks]
    except BaseException:
        await runner.cleanup()
        raise
    return Listening(runner, servers)


def _bearer(headers: CIMultiDictProxy[str]) -> str | None:
    auth = headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")


class _Gateway:
    def __init__(
        self, registry: Registry, config: GatewayConfig, upstream: aiohttp.ClientSession | None
    ) -> None:
        self.registry = registry
        self.config = config
        self.keys = [k.encode("utf-8", "surrogatepass") for k in config.api_keys]
        self.m = Metrics(config.extra_collector)
        self.session = upstream
        self.created = int(time.time())

    async def client_session(self, app: web.Application) -> AsyncIterator[None]:
        if self.session is not None:  # injected: its owner closes it
            yield
            return
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
