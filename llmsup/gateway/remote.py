"""The gateway's remote models: their upstreams probed, chosen, counted and reported.

`RemoteModels` lives in the gateway process beside `Routing`, which hands it the
requests for remote models. A task per model probes each of its upstreams every
`interval` (GET /v1/models with the model's key, within `timeout`: the model must be
listed, and READY there when the upstream is an llmsup gateway). A request goes to
the UP upstream with the fewest requests in flight; one that could not reach its
upstream counts against it, and may go to another once (the app decides when).
Every change is reported (`report`): the worker sends it to the daemon, for
`llmsup status`. The rules themselves are pure: llmsup.gateway.upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from llmsup.backends.remote import NAME, Remote
from llmsup.errors import ModelNotReady, ModelUnavailable
from llmsup.gateway.routing import Route
from llmsup.gateway.upstream import (
    DOWN,
    UP,
    Candidate,
    Failure,
    Health,
    RemoteReport,
    UpstreamReport,
    choose,
    failed,
    judge,
    model_state,
    probed,
)
from llmsup.state import State

log = logging.getLogger(__name__)

PROBE_BODY_LIMIT = 4 * 2**20  # bytes of a model list read at most
Report = Callable[[tuple[RemoteReport, ...]], None]


def describe(e: BaseException) -> str:
    """A connection error in a few words: `connection refused`, `connection reset by peer`."""
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "the connection closed before an answer"
    if isinstance(e, aiohttp.ClientConnectorError):
        os_error: OSError = e.os_error
    elif isinstance(e, OSError):
        os_error = e
    else:
        return str(e) or type(e).__name__
    code = os_error.errno
    if code is not None and code > 0 and code in errno.errorcode:
        return os.strerror(code).lower()
    return os_error.strerror or str(os_error) or type(os_error).__name__


class _Upstream:
    def __init__(self, url: str, now: float) -> None:
        self.url = url
        self.health = Health(since=now)
        self.in_flight = 0
        self.last_pick = 0
        self.latency: float | None = None  # of its last probe that answered
        self.probe_failures = 0
        self.gone = asyncio.Event()  # set while DOWN: the requests it holds let go

    def report(self) -> UpstreamReport:
        h = self.health
        return UpstreamReport(self.url, h.state, h.error, h.since, h.error_at, self.latency)


class _Model:
    def __init__(self, spec: Remote, now: float) -> None:
        self.spec = spec
        self.key = spec.key
        self.upstreams = [_Upstream(url, now) for url in spec.urls]
        self.changed = asyncio.Event()

    @property
    def name(self) -> str:
        return self.spec.name

    def report(self) -> RemoteReport:
        ups = tuple(u.report() for u in self.upstreams)
        return RemoteReport(self.name, model_state([u.health for u in self.upstreams]), ups)

    def upstream(self, url: str) -> _Upstream | None:
        return next((u for u in self.upstreams if u.url == url), None)


class RemoteModels:
    """The remote models of one gateway (`Routing`'s `Remotes`): run `run()` for
    their probes; `report` hears every change of their upstreams."""

    def __init__(
        self,
        remotes: Sequence[Remote],
        report: Report = lambda reports: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        now = clock()
        self.models = {r.name: _Model(r, now) for r in remotes}
        self.by_served = {s: m for m in self.models.values() for s in m.spec.served_names}
        self._report = report
        self._clock = clock
        self._picks = itertools.count(1)
        self._routes: list[Route] | None = None  # the listing, until something changes
        self._sent: tuple[RemoteReport, ...] | None = None

    # ------------------------------------------------------------ routes

    def serves(self, served_name: str) -> bool:
        return served_name in self.by_served

    def _route(self, m: _Model, served_name: str, u: _Upstream | None = None) -> Route:
        report = m.report()
        upstream = u.url if u is not None else ""
        return Route(
            served_name=served_name,
            unit=m.name,
            backend=NAME,
            base_url=upstream,
            api_key=m.key,
            state=report.state.value,
            reason=report.reason or report.detail,
            on_demand=False,
            upstream=upstream,
            upstreams=report.upstreams,
            read_timeout=m.spec.read_timeout,
            connect_timeout=m.spec.timeout,
            gone=u.gone if u is not None else None,
        )

    def routes(self) -> list[Route]:
        if self._routes is None:
            self._routes = [
                self._route(m, name) for m in self.models.values() for name in m.spec.served_names
            ]
        return self._routes

    async def acquire(self, served_name: str, wait: float) -> Route:
        """An UP upstream's route. While none is UP but some has not answered its first
        probe yet, wait for it (at most one probe's timeout); then ModelNotReady. None
        UP: ModelUnavailable at once, with each upstream's last error."""
        m = self.by_served[served_name]
        deadline = time.monotonic() + min(wait, m.spec.timeout + 0.5)
        while True:
            route = self._take(m, served_name)
            if route is not None:
                return route
            state = model_state([u.health for u in m.upstreams])
            left = deadline - time.monotonic()
            if state != State.STARTING or left <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(m.changed.wait(), left)
        retry = max(1, math.ceil(m.spec.interval))
        if state == State.STARTING:
            raise ModelNotReady("its upstreams have not answered a health probe yet", retry)
        raise ModelUnavailable(f"no upstream is up ({m.report().reason})", retry_after=retry)

    def _take(self, m: _Model, served_name: str, avoid: str = "") -> Route | None:
        candidates = [
            Candidate(i, u.health.up, u.in_flight, u.last_pick) for i, u in enumerate(m.upstreams)
        ]
        skip = [i for i, u in enumerate(m.upstreams) if u.url == avoid]
        index = choose(candidates, skip)
        if index is None:
            return None
        u = m.upstreams[index]
        u.in_flight += 1
        u.last_pick = next(self._picks)
        return self._route(m, served_name, u)

    def release(self, route: Route) -> None:
        m = self.models.get(route.unit)
        u = m.upstream(route.upstream) if m is not None else None
        if u is not None:
            u.in_flight = max(0, u.in_flight - 1)

    def failed(self, route: Route, failure: Failure, error: str) -> None:
        m = self.models.get(route.unit)
        u = m.upstream(route.upstream) if m is not None else None
        if m is None or u is None or not failure.counted:
            return
        log.warning("%s: upstream %s: %s", m.name, u.url, error)
        self._set(m, u, failed(u.health, failure, error, m.spec.failures, self._clock()))
        self._publish()

    def another(self, route: Route) -> Route | None:
        m = self.models.get(route.unit)
        return self._take(m, route.served_name, route.upstream) if m is not None else None

    # ------------------------------------------------------------ health

    def _set(self, m: _Model, u: _Upstream, health: Health) -> None:
        if health == u.health:
            return
        if health.state != u.health.state:
            why = f": {health.error}" if health.state != UP else ""
            log.info("%s: upstream %s is %s%s", m.name, u.url, health.state, why)
            if health.state == DOWN:
                u.gone.set()
            elif u.gone.is_set():
                u.gone = asyncio.Event()  # for the requests routed to it from now on
        u.health = health
        self._routes = None
        m.changed.set()  # wakes every waiter; the next wait waits afresh
        m.changed = asyncio.Event()

    async def run(self) -> None:
        """Probe every upstream of every model, each model at its interval, until cancelled."""
        if not self.models:
            return
        # A fresh connection per probe: a probe also finds out that connects work.
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(self._probe_loop(session, m) for m in self.models.values()))

    async def _probe_loop(self, session: aiohttp.ClientSession, m: _Model) -> None:
        while True:
            began = time.monotonic()
            await asyncio.gather(*(self._probe(session, m, u) for u in m.upstreams))
            self._publish()
            await asyncio.sleep(max(0.0, m.spec.interval - (time.monotonic() - began)))

    async def _probe(self, session: aiohttp.ClientSession, m: _Model, u: _Upstream) -> None:
        headers = {"Authorization": f"Bearer {m.key}"} if m.key else {}
        timeout = aiohttp.ClientTimeout(total=m.spec.timeout)
        began = time.monotonic()
        error: str | None
        try:
            async with session.get(f"{u.url}/v1/models", headers=headers, timeout=timeout) as r:
                raw = await r.content.read(PROBE_BODY_LIMIT)
                status = r.status
            u.latency = time.monotonic() - began
            try:
                body = json.loads(raw) if status == 200 else None
            except ValueError:
                body = None
            error = judge(status, body, m.spec.served_names)
        except asyncio.TimeoutError:
            error = f"no answer to GET /v1/models within {m.spec.timeout:g}s"
        except aiohttp.ClientError as e:
            error = describe(e)
        if error is not None:
            u.probe_failures += 1
        self._set(m, u, probed(u.health, error, m.spec.failures, self._clock()))

    # ------------------------------------------------------------ reports

    def reports(self) -> tuple[RemoteReport, ...]:
        return tuple(m.report() for m in self.models.values())

    def _publish(self) -> None:
        reports = self.reports()
        if reports != self._sent:
            self._sent = reports
            self._report(reports)

    def collect(self) -> Iterator[Metric]:
        """Per upstream, for the gateway's /metrics: up, in flight, probe failures and
        latency (its requests and errors are counted by the app)."""
        labels = ["model", "upstream"]
        up = GaugeMetricFamily("llmsup_upstream_up", "1 while the upstream is UP", labels=labels)
        in_flight = GaugeMetricFamily(
            "llmsup_upstream_in_flight", "Requests in flight to the upstream", labels=labels
        )
        probe_failures = CounterMetricFamily(
            "llmsup_upstream_probe_failures", "Health probes that failed", labels=labels
        )
        latency = GaugeMetricFamily(
            "llmsup_upstream_probe_latency_seconds",
            "Latency of the last health probe that answered",
            labels=labels,
        )
        for m in self.models.values():
            for u in m.upstreams:
                key = [m.name, u.url]
                up.add_metric(key, 1.0 if u.health.state == UP else 0.0)
                in_flight.add_metric(key, float(u.in_flight))
                probe_failures.add_metric(key, float(u.probe_failures))
                if u.latency is not None:
                    latency.add_metric(key, u.latency)
        yield from (up, in_flight, probe_failures, latency)
