"""Client connections: a cap on how many, and header and keep-alive timeouts,
around aiohttp's own protocol (which has neither)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web

from llmsup.errors import ApiError
from llmsup.gateway.config import GatewayConfig
from llmsup.gateway.metrics import Metrics


def raw_response(err: ApiError) -> bytes:
    """A whole HTTP/1.1 answer, for a connection aiohttp never handles (or no longer)."""
    body = json.dumps(err.body()).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}.get(err.status, "Error")
    head = [f"HTTP/1.1 {err.status} {reason}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in err.headers.items()]
    head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(head).encode() + body


class Guard:
    """Counts the gateway's client connections and refuses those over the cap."""

    def __init__(
        self, factory: Callable[[], asyncio.Protocol], config: GatewayConfig, m: Metrics
    ) -> None:
        self.factory = factory
        self.config = config
        self.m = m
        self.open = 0
        full = f"The gateway is at its limit of {config.max_connections} connections"
        self.full = raw_response(
            ApiError(503, full, "server_error", "too_many_connections", {"Retry-After": "1"})
        )
        late = f"Request headers did not arrive within {config.header_timeout:g}s"
        self.late = raw_response(ApiError(408, late, "invalid_request_error", "request_timeout"))

    def protocol(self) -> asyncio.Protocol:
        return Guarded(self)


class Guarded(asyncio.Protocol):
    """One client connection: aiohttp's protocol, behind the cap and two timers.

    From its first byte, a request has `header_timeout` to complete its headers (then
    408, as nginx answers); a new connection has as long to send that first byte,
    and one between two requests `keepalive_timeout` (then a quiet close). While a
    request is handled (see `busy_while_handled`) no timer runs: the body has its
    own, and a response may stream for as long as the model writes."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False  # a request is being handled
        self.pending = False  # part of the next request has arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, whatever its class: uvloop's are no asyncio.Transport.
        self.transport = transport = cast(asyncio.Transport, transport)
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

    # -- called around each request by busy_while_handled

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
async def busy_while_handled(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Tell the connection's guard that a request is being handled (its headers
    arrived), and when it is over."""
    conn = request.transport.get_protocol() if request.transport is not None else None
    if not isinstance(conn, Guarded):
        return await handler(request)
    conn.request_started()
    try:
        return await handler(request)
    finally:
        conn.request_done()
