"""Which server answers a request: routes, on-demand starts, swaps and idle stops.

`Registry` is what the gateway's app asks; `Routing` implements it over the
daemon's `Servers` (llmsup.control), and owns the gateway's counts: requests in
flight per server, when each was last used, and which are being drained for a swap.
Remote models (served on other hosts) it hands to `Remotes` (llmsup.gateway.remote),
which picks one of their upstreams per request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from llmsup.control import Servers, ServerView
from llmsup.errors import ModelNotReady, ModelUnavailable
from llmsup.gateway.upstream import Failure, UpstreamReport
from llmsup.state import State


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
    # A remote model's: the upstream this request goes to (its base_url; "" in a listing),
    # every upstream's state, how long its answer may pause and its connect may take.
    upstream: str = ""
    upstreams: tuple[UpstreamReport, ...] = ()
    read_timeout: float | None = None  # None: the gateway's own
    connect_timeout: float | None = None
    # Set once probes find `upstream` down: a request still waiting for its answer then
    # goes to another upstream instead of waiting out the timeouts of a vanished host.
    gone: asyncio.Event | None = field(default=None, compare=False)


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

    def failed(self, route: Route, failure: Failure, error: str) -> None:
        """The request on `route` failed before any byte reached its client: counted
        against the route's upstream (a remote model's; a no-op for a local server)."""
        ...

    def another(self, route: Route) -> Route | None:
        """Another upstream of `route`'s remote model, acquired (release it too), for a
        request that failed on `route` before any byte reached its client; None when
        there is none up, or `route` is a local server's."""
        ...


class Remotes(Protocol):
    """The remote models `Routing` routes to (llmsup.gateway.remote.RemoteModels)."""

    def serves(self, served_name: str) -> bool: ...

    def routes(self) -> list[Route]: ...

    async def acquire(self, served_name: str, wait: float) -> Route: ...

    def release(self, route: Route) -> None: ...

    def failed(self, route: Route, failure: Failure, error: str) -> None: ...

    def another(self, route: Route) -> Route | None: ...


RETRY_AFTER = 5  # seconds a client is told to wait for a model that is starting
DRAIN_LIMIT = 60.0  # how long a swap waits for the requests of the model it stops
_SETTLED = (State.READY, State.FAILED, State.STOPPED)


class Routing:
    """The gateway's routing policy: it owns the requests in flight per server, when
    each was last used and which are being swapped out (drained)."""

    def __init__(self, control: Servers, remotes: Remotes | None = None) -> None:
        self.control = control
        self.remotes = remotes
        self._swap = asyncio.Lock()
        self.in_flight: dict[str, int] = {}  # unit -> requests being served
        self.last_used: dict[str, float] = {}  # unit -> when READY or last used (monotonic)
        self.draining: set[str] = set()  # units being stopped for a swap

    def _server(self, served_name: str) -> ServerView:
        for s in self.control.views():
            if served_name in s.launch.served_names:
                return s
        raise ModelUnavailable(f"no server serves {served_name!r}")

    def _route(self, s: ServerView, served_name: str) -> Route:
        la = s.launch
        host = "127.0.0.1" if la.host in ("0.0.0.0", "") else la.host
        host = f"[{host}]" if ":" in host else host
        return Route(
            served_name=served_name,
            unit=la.unit,
            backend=la.backend,
            base_url=f"http://{host}:{la.port}",
            api_key=s.api_key,
            state=s.state.value,
            reason=s.reason or s.detail,
            on_demand=s.on_demand,
        )

    def routes(self) -> list[Route]:
        views = self.control.views()
        local = [self._route(s, name) for s in views for name in s.launch.served_names]
        return local + self.remotes.routes() if self.remotes is not None else local

    async def acquire(self, served_name: str, wait: float) -> Route:
        if self.remotes is not None and self.remotes.serves(served_name):
            return await self.remotes.acquire(served_name, wait)
        s = self._server(served_name)
        unit = s.launch.unit
        deadline = time.monotonic() + wait
        if s.state == State.READY and unit not in self.draining:
            return self._take(s, served_name)
        if s.state == State.FAILED:
            raise ModelUnavailable(f"{unit} FAILED: {s.reason}")
        if unit in self.draining:
            raise ModelNotReady(f"{unit} is being swapped out", RETRY_AFTER)
        if not s.on_demand:
            if s.state == State.STOPPED:
                raise ModelUnavailable(f"{unit} is stopped", stopped=True)
            raise ModelNotReady(f"{unit} is {s.state.value.lower()}", RETRY_AFTER)
        if not s.active:
            # Shielded: a client that gives up does not abort a start it began.
            await asyncio.shield(asyncio.ensure_future(self._start(unit)))
        while True:
            now = self.control.view(unit)
            if now is None:  # removed by a reload meanwhile
                raise ModelUnavailable(f"{unit} is no longer in the manifest")
            s = now
            if s.state in _SETTLED:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise ModelNotReady(
                    f"{unit} is starting ({s.progress or s.state.value.lower()})", RETRY_AFTER
                )
            await self.control.wait_change(left)
        if s.state == State.READY:
            return self._take(s, served_name)
        reason = f"{unit} {s.state.value}: {s.reason or s.detail}"
        raise ModelUnavailable(reason, stopped=s.state == State.STOPPED)  # stopped while starting

    def _take(self, s: ServerView, served_name: str) -> Route:
        unit = s.launch.unit
        self.in_flight[unit] = self.in_flight.get(unit, 0) + 1
        self.last_used[unit] = time.monotonic()
        return self._route(s, served_name)

    def failed(self, route: Route, failure: Failure, error: str) -> None:
        if route.upstream and self.remotes is not None:
            self.remotes.failed(route, failure, error)

    def another(self, route: Route) -> Route | None:
        if route.upstream and self.remotes is not None:
            return self.remotes.another(route)
        return None

    def release(self, route: Route) -> None:
        if route.upstream and self.remotes is not None:
            self.remotes.release(route)
            return
        left = self.in_flight.get(route.unit, 0) - 1
        if left > 0:
            self.in_flight[route.unit] = left
        else:
            self.in_flight.pop(route.unit, None)
        self.last_used[route.unit] = time.monotonic()

    async def _start(self, unit: str) -> None:
        """Start an on-demand server, first draining and stopping those it cannot
        run beside (its exclusive group, or not enough GPU memory for both)."""
        async with self._swap:
            s = self.control.view(unit)
            if s is None or s.active:
                return
            victims = [
                o.launch.unit
                for o in self.control.views()
                if o.launch.unit != unit
                and o.on_demand
                and o.active
                and self.control.conflicts(o.launch.unit, unit)
            ]
            self.draining.update(victims)
            try:
                end = time.monotonic() + DRAIN_LIMIT
                while any(self.in_flight.get(v) for v in victims) and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                await asyncio.gather(*(self.control.stop_server(v) for v in victims))
            finally:
                self.draining.difference_update(victims)
            await self.control.start_server(unit)

    async def idle_loop(self) -> None:
        """Stop on-demand servers that had no request for their idle_timeout, counted
        from their last request or from when they became READY."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for s in self.control.views():
                unit, limit = s.launch.unit, s.idle_timeout
                if s.state != State.READY:
                    self.last_used.pop(unit, None)
                    continue
                since = self.last_used.setdefault(unit, now)
                if (
                    s.on_demand
                    and limit is not None
                    and not self.in_flight.get(unit)
                    and now - since >= limit
                ):
                    await self.control.stop_server(unit, f"idle for {limit:g}s")
