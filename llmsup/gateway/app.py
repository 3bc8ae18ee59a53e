"""The gateway's HTTP application: authentication, routing, relaying, errors.

It runs inside the daemon's event loop, so nothing here blocks: bodies are relayed
chunk by chunk as they arrive, and large request bodies are parsed in a worker
thread. The daemon supplies a `Registry` (which names exist, and a READY server
for a name); the gateway only routes, authenticates, streams and counts.

A remote model's request goes to one of its upstreams (the registry picks); one that
fails before any byte reached the client (connection refused or reset, our key
refused, 503, its upstream found down by the probes meanwhile) goes to another
upstream once. Its answer's headers are held until
its first body byte, so that an upstream that stalls after its headers gets a 504
after the model's read_timeout rather than a stream that never moves.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from llmsup.errors import ApiError, ModelNotReady, ModelUnavailable
from llmsup.gateway.config import GatewayConfig
from llmsup.gateway.connections import Guard, busy_while_handled
from llmsup.gateway.metrics import Metrics
from llmsup.gateway.remote import describe
from llmsup.gateway.routing import Registry, Route
from llmsup.gateway.upstream import Failure

log = logging.getLogger(__name__)


# Headers that belong to one connection (RFC 9110 7.6.1), plus those we set ourselves.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te"}
    | {"trailer", "trailers", "transfer-encoding", "upgrade", "expect"}
)
_NOT_UPSTREAM = _HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key"}
_NOT_DOWNSTREAM = _HOP_BY_HOP | {"content-length", "date", "server"}
_THREAD_PARSE_BYTES = 256 * 1024  # json.loads of more than this would stall the loop
# Gateways a request went through on its way to a remote model: a loop of gateways
# (A's remote model at B, B's at A) ends with 508 instead of going round for ever.
HOPS = "X-Llmsup-Hops"
MAX_HOPS = 8
_ERROR_BODY_BYTES = 64 * 1024  # of an upstream's 503, for its message


class _Gone(Exception):
    """The upstream a request waits on was found down by the probes."""


class _Unsent(Exception):
    """A request that failed before any byte reached its client: `error` is its answer,
    unless `failure` allows another upstream to take it (`detail` says what happened)."""

    def __init__(self, error: ApiError, failure: Failure | None = None, detail: str = "") -> None:
        super().__init__(error.message)
        self.error = error
        self.failure = failure
        self.detail = detail or error.message


def _response(e: ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers)


_GATEWAY: web.AppKey[_Gateway] = web.AppKey("llmsup_gateway")
STOP_GRACE = 5.0  # seconds the requests in flight get when the gateway stops


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

    def __init__(self, runner: web.AppRunner, servers: list[asyncio.Server], gw: _Gateway) -> None:
        self.runner = runner
        self.servers = servers
        self.gw = gw

    @property
    def addresses(self) -> list[Any]:
        return [sock.getsockname() for server in self.servers for sock in server.sockets]

    async def cleanup(self, grace: float = STOP_GRACE) -> None:
        """No new connection; the requests in flight get `grace` seconds, then each
        stream still relaying ends with an error event (at its next chunk), and the
        rest are closed."""
        for server in self.servers:
            server.close()  # no new connections
        deadline = time.monotonic() + grace
        while self.gw.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.gw.active:
            self.gw.stopping = True
            await asyncio.sleep(0.2)  # a relaying stream writes its error event
        await self.runner.cleanup()  # what is left (idle streams): closed


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
    return Listening(runner, servers, gw)


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
        self.active = 0  # proxied requests in flight
        self.stopping = False  # streams still relaying end with an error event

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
            if r.upstreams:
                info["upstreams"] = [
                    {"url": u.url, "state": u.state, "error": u.error} for u in r.upstreams
                ]
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
            listed = next((r for r in self.registry.routes() if r.served_name == served), None)
            if listed is None:
                raise self.not_found(name)
            label = served
            if listed.backend == "remote" and _hops(request) >= MAX_HOPS:
                message = f"`{name}` went through {MAX_HOPS} gateways: their remote models loop"
                raise ApiError(508, message, "server_error", "loop_detected")
            if served != name:  # the backend knows only its served name
                obj["model"] = served
                body = await _off_loop(len(body), lambda: json.dumps(obj).encode())
            route = await self.acquire(name, served)
            in_flight = self.m.in_flight.labels(served)
            in_flight.inc()
            self.active += 1
            try:
                response, code = await self.attempts(
                    request, route, body, obj.get("stream") is True
                )
                return response
            finally:
                in_flight.dec()
                self.active -= 1
        except (ApiError, web.HTTPException) as e:
            code = e.status
            raise
        except asyncio.CancelledError:
            code = 499  # the client went away (nginx's code for it)
            raise
        finally:
            self.m.requests.labels(label, str(code)).inc()

    async def acquire(self, name: str, served: str) -> Route:
        try:
            return await self.registry.acquire(served, self.config.start_wait)
        except ModelNotReady as e:
            message = f"Model `{name}` is not ready yet: {e.reason}"
            retry = {"Retry-After": str(max(1, e.retry_after))}
            raise ApiError(503, message, "server_error", "model_not_ready", retry) from None
        except ModelUnavailable as e:
            if e.stopped:  # said to an API client: no shell command to run
                message = f"Model `{name}` is stopped and is not accepting requests"
                raise ApiError(503, message, "server_error", "model_stopped") from None
            message = f"Model `{name}` is unavailable: {e.reason}"
            after = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else {}
            raise ApiError(503, message, "server_error", "model_unavailable", after) from None

    async def attempts(
        self, request: web.Request, route: Route, body: bytes, wants_stream: bool
    ) -> tuple[web.StreamResponse, int]:
        """Forward on `route` (released after); a failure before any byte reached the
        client is counted against its upstream, and tried once on another."""
        retried = False
        while True:
            again = None
            try:
                return await self.forward(request, route, body, wants_stream)
            except _Unsent as u:
                if u.failure is not None:
                    self.registry.failed(route, u.failure, u.detail)
                    if u.failure.retried and not retried:
                        again = self.registry.another(route)
                if again is None:
                    raise u.error from None
                log.warning("gateway: %s: %s; trying %s", route.upstream, u.detail, again.upstream)
            finally:
                self.registry.release(route)
            route, retried = again, True

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
        if route.upstream:
            headers[HOPS] = str(_hops(request) + 1)
        cfg = self.config
        connect = route.connect_timeout or cfg.connect_timeout
        # sock_read covers the wait for headers; it is shortened to read_timeout below.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect, sock_read=cfg.first_byte_timeout
        )
        url = URL(route.base_url.rstrip("/") + request.rel_url.raw_path_qs, encoded=True)
        started = time.monotonic()
        send = self.session.request(
            request.method, url, data=body, headers=headers, timeout=timeout
        )
        try:
            upstream = await self._answer(route, send, connect)
        except _Unsent as u:
            if route.upstream and u.failure is not None:
                self.m.upstream_errors.labels(route.unit, route.upstream, u.failure.value).inc()
            raise
        self.m.latency.labels(route.served_name).observe(time.monotonic() - started)
        try:
            if route.upstream:
                self.m.upstream_requests.labels(route.unit, route.upstream, upstream.status).inc()
                await self._refused(route, upstream)
            return await self.relay(request, route, upstream, wants_stream)
        finally:
            if upstream.content.is_eof():
                upstream.release()  # back to the pool, kept alive
            else:
                upstream.close()  # unfinished: the backend sees the connection close

    @staticmethod
    async def _answer(
        route: Route, send: Coroutine[Any, Any, aiohttp.ClientResponse], connect: float
    ) -> aiohttp.ClientResponse:
        """The upstream's answer (its headers), or _Unsent saying how it failed."""
        where = _where(route)
        try:
            return await _awaiting(send, route.gone)
        except _Gone:
            detail = "found down by its probes while the request waited for its answer"
            error = ApiError(502, f"{where} was {detail}", "server_error", "upstream_unreachable")
            raise _Unsent(error, Failure.GONE, detail) from None
        except aiohttp.ConnectionTimeoutError:  # before the TimeoutError it also is
            detail = f"no connection within {connect:g}s"
            message = f"Cannot reach {where}: {detail}"
            error = ApiError(502, message, "server_error", "upstream_unreachable")
            raise _Unsent(error, Failure.REFUSED, detail) from None
        except asyncio.TimeoutError:
            message = f"{where} did not answer in time"
            error = ApiError(504, message, "server_error", "upstream_timeout")
            raise _Unsent(error, Failure.TIMEOUT, "did not answer in time") from None
        except aiohttp.ClientError as e:
            message = f"Cannot reach {where}: {describe(e) if route.upstream else e}"
            error = ApiError(502, message, "server_error", "upstream_unreachable")
            raise _Unsent(error, _failure(e), describe(e)) from None

    async def _refused(self, route: Route, upstream: aiohttp.ClientResponse) -> None:
        """A remote model's upstream that refused our key (401) or is not ready (503):
        _Unsent, for another upstream to take the request."""
        if upstream.status == 401:
            message = (
                f"Upstream {route.upstream} of `{route.served_name}` refused our key (401): "
                f"check api_key of model {route.unit}"
            )
            error = ApiError(502, message, "server_error", "upstream_unauthorized")
            raise _Unsent(error, Failure.KEY, "refused our key (401): check api_key")
        if upstream.status == 503:
            said = await _error_message(upstream, route.read_timeout or self.config.read_timeout)
            message = f"Upstream {route.upstream} of `{route.served_name}` is unavailable: {said}"
            after = upstream.headers.get("Retry-After")
            extra = {"Retry-After": after} if after else {}
            error = ApiError(503, message, "server_error", "upstream_unavailable", extra)
            raise _Unsent(error, Failure.UNAVAILABLE, f"answered 503: {said}")

    async def relay(
        self,
        request: web.Request,
        route: Route,
        upstream: aiohttp.ClientResponse,
        wants_stream: bool,
    ) -> tuple[web.StreamResponse, int]:
        headers = CIMultiDict(
            (k, v) for k, v in upstream.headers.items() if k.lower() not in _NOT_DOWNSTREAM
        )
        read_timeout = route.read_timeout or self.config.read_timeout
        if upstream.connection is not None and upstream.connection.protocol is not None:
            upstream.connection.protocol.read_timeout = read_timeout
        ctype = upstream.headers.get("Content-Type", "")
        streaming = ctype.startswith("text/event-stream") or upstream.content_length is None
        if not (streaming or wants_stream):
            # A complete JSON answer: one write of headers and body (a StreamResponse
            # sends its headers apart, a second syscall per request).
            try:
                body = await upstream.read()
            except asyncio.TimeoutError:  # aiohttp's ServerTimeoutError too
                self._mid_response(route)
                message = f"Upstream stopped sending mid-response for {read_timeout:g}s"
                raise ApiError(504, message, "server_error", "upstream_timeout") from None
            except aiohttp.ClientError as e:
                self._mid_response(route)
                message = f"Upstream failed mid-response: {e!r}"
                raise ApiError(502, message, "server_error", "upstream_failed") from None
            return web.Response(status=upstream.status, body=body, headers=headers), upstream.status
        first = await self._first_chunk(route, upstream, read_timeout) if route.upstream else b""
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"  # an nginx in front must not buffer either
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        await resp.prepare(request)
        tail = b"\n\n"  # the end of what was relayed: is an event left half-written?
        chunk = first
        while True:
            if chunk:
                tail = (tail + chunk)[-2:]
                try:
                    await resp.write(chunk)
                except ConnectionError:  # the client went away
                    return resp, 499
            try:
                chunk = await upstream.content.readany()  # what has arrived; no waiting for more
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("gateway: upstream failed mid-stream: %r", e)
                self._mid_response(route)
                err = ApiError(
                    502, f"Upstream failed mid-stream: {e!r}", "server_error", "upstream_failed"
                )
                await self._error_event(resp, ctype, tail, err)
                # Headers are sent: cutting the connection (no [DONE], no last chunk) is
                # what tells any client that the answer is incomplete.
                if request.transport is not None:
                    request.transport.close()
                return resp, 502
            if not chunk:
                return resp, upstream.status
            if self.stopping:  # its grace is over (the daemon stopped, died or restarts)
                err = ApiError(503, STOPPING, "server_error", "gateway_stopping")
                await self._error_event(resp, ctype, tail, err)
                if request.transport is not None:
                    request.transport.close()
                return resp, 503

    async def _first_chunk(
        self, route: Route, upstream: aiohttp.ClientResponse, read_timeout: float
    ) -> bytes:
        """A remote model's first body bytes, before any header goes to the client: an
        upstream that stalls after its headers is a 504, one that fails another upstream's
        turn."""
        try:
            # Its own deadline: the connection's read timer runs from the last bytes
            # received, with the (longer) timeout set before the headers came.
            return await _awaiting(upstream.content.readany(), route.gone, read_timeout)
        except _Gone:
            detail = "found down by its probes before its first byte"
            message = f"Upstream {route.upstream} of `{route.served_name}` was {detail}"
            error = ApiError(502, message, "server_error", "upstream_failed")
            raise _Unsent(error, Failure.GONE, detail) from None
        except asyncio.TimeoutError:
            detail = f"sent its headers, then nothing for {read_timeout:g}s"
            message = f"Upstream {route.upstream} of `{route.served_name}` {detail} (read_timeout)"
            error = ApiError(504, message, "server_error", "upstream_timeout")
            self.m.upstream_errors.labels(route.unit, route.upstream, Failure.TIMEOUT.value).inc()
            raise _Unsent(error, Failure.TIMEOUT, detail) from None
        except aiohttp.ClientError as e:
            detail = f"failed before its first byte: {describe(e)}"
            message = f"Upstream {route.upstream} of `{route.served_name}` {detail}"
            error = ApiError(502, message, "server_error", "upstream_failed")
            self.m.upstream_errors.labels(route.unit, route.upstream, Failure.RESET.value).inc()
            raise _Unsent(error, Failure.RESET, detail) from None

    def _mid_response(self, route: Route) -> None:
        if route.upstream:
            self.m.upstream_errors.labels(route.unit, route.upstream, "mid_response").inc()

    @staticmethod
    async def _error_event(
        resp: web.StreamResponse, ctype: str, tail: bytes, err: ApiError
    ) -> None:
        """An SSE stream gets a last event in OpenAI's error shape (as vLLM sends
        for a failure mid-stream), which OpenAI's client libraries raise as an error."""
        if not ctype.startswith("text/event-stream"):
            return
        event = b"data: " + json.dumps(err.body()).encode() + b"\n\n"
        with contextlib.suppress(ConnectionError):
            await resp.write(event if tail.endswith(b"\n\n") else b"\n\n" + event)


T = TypeVar("T")


async def _awaiting(
    work: Coroutine[Any, Any, T], gone: asyncio.Event | None, timeout: float | None = None
) -> T:
    """`work`'s result, unless `timeout` passes first (asyncio.TimeoutError) or `gone`
    is set (_Gone): `work` is then cancelled."""
    if gone is None:
        return await asyncio.wait_for(work, timeout)
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()  # gone, timed out, or we are cancelled (the client left)
    if task.done() and not task.cancelled():
        return task.result()
    raise _Gone() if gone.is_set() else asyncio.TimeoutError()


STOPPING = "The gateway is stopping (its llmsup daemon stopped or restarts): retry the request"


def _hops(request: web.Request) -> int:
    try:
        return max(0, int(request.headers.get(HOPS, "0")))
    except ValueError:
        return 0


def _where(route: Route) -> str:
    if route.upstream:
        return f"upstream {route.upstream} of `{route.served_name}`"
    return f"`{route.served_name}` ({route.unit})"


def _failure(e: aiohttp.ClientError) -> Failure | None:
    """How a request failed before its answer began: refused (no connection), reset
    (the connection closed), or otherwise (None: not retried)."""
    if isinstance(e, aiohttp.ClientConnectorError):
        return Failure.REFUSED
    if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return Failure.RESET
    return None


async def _error_message(upstream: aiohttp.ClientResponse, timeout: float) -> str:
    """The message of an upstream's error answer (OpenAI's shape, or its text)."""
    try:
        raw = await asyncio.wait_for(upstream.content.read(_ERROR_BODY_BYTES), min(timeout, 10))
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return f"(its answer could not be read: {describe(e)})"
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return raw.decode("utf-8", "replace")[:300] or f"HTTP {upstream.status}"


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
