"""The daemon as the gateway sees it: routes, on-demand starts, swaps, idle stops,
and the per-model Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from llmsup.gateway import NotReady, Route, Unavailable
from llmsup.plan import conflicts
from llmsup.state import State

if TYPE_CHECKING:
    from llmsup.daemon import Daemon, Server

RETRY_AFTER = 5  # seconds a client is told to wait for a model that is starting
DRAIN_LIMIT = 60.0  # how long a swap waits for the requests of the model it stops


class DaemonRegistry:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._swap = asyncio.Lock()

    def _server(self, served_name: str) -> Server:
        for s in self.daemon.servers.values():
            if served_name in s.launch.served_names:
                return s
        raise Unavailable(f"no server serves {served_name!r}")

    def _route(self, s: Server, served_name: str) -> Route:
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
        return [
            self._route(s, name)
            for s in self.daemon.servers.values()
            for name in s.launch.served_names
        ]

    async def acquire(self, served_name: str, wait: float) -> Route:
        s = self._server(served_name)
        deadline = time.monotonic() + wait
        if s.state == State.READY and not s.draining:
            return self._take(s, served_name)
        if s.state == State.FAILED:
            raise Unavailable(f"{s.launch.unit} FAILED: {s.reason}")
        if s.draining:
            raise NotReady(f"{s.launch.unit} is being swapped out", RETRY_AFTER)
        if not s.on_demand:
            if s.state == State.STOPPED:
                raise Unavailable(f"{s.launch.unit} is stopped", stopped=True)
            raise NotReady(f"{s.launch.unit} is {s.state.value.lower()}", RETRY_AFTER)
        if s.task is None or s.task.done():
            # Shielded: a client that gives up does not abort a start it began.
            await asyncio.shield(asyncio.ensure_future(self._start(s)))
        async with self.daemon.cond:
            while s.state not in (State.READY, State.FAILED, State.STOPPED):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NotReady(
                        f"{s.launch.unit} is starting ({s.progress or s.state.value.lower()})",
                        RETRY_AFTER,
                    )
                try:
                    await asyncio.wait_for(self.daemon.cond.wait(), left)
                except asyncio.TimeoutError:
                    continue
        if s.state == State.READY:
            return self._take(s, served_name)
        reason = f"{s.launch.unit} {s.state.value}: {s.reason or s.detail}"
        raise Unavailable(reason, stopped=s.state == State.STOPPED)  # stopped while starting

    def _take(self, s: Server, served_name: str) -> Route:
        s.in_flight += 1
        s.last_used = time.monotonic()
        return self._route(s, served_name)

    def release(self, route: Route) -> None:
        s = self.daemon.servers.get(route.unit)
        if s is not None:
            s.in_flight = max(0, s.in_flight - 1)
            s.last_used = time.monotonic()

    async def _start(self, s: Server) -> None:
        """Start an on-demand server, first draining and stopping those it cannot
        run beside (its exclusive group, or not enough GPU memory for both)."""
        async with self._swap:
            if s.task is not None and not s.task.done():
                return
            loaded = self.daemon.loaded
            victims = [
                o
                for o in self.daemon.servers.values()
                if o is not s
                and o.on_demand
                and o.task is not None
                and not o.task.done()
                and conflicts(loaded, o.launch.models[0], s.launch.models[0])
            ]
            for v in victims:
                v.draining = True
            try:
                end = time.monotonic() + DRAIN_LIMIT
                while any(v.in_flight for v in victims) and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                await asyncio.gather(*(v.stop() for v in victims))
            finally:
                for v in victims:
                    v.draining = False
            s.tracker.reset()
            s.reason = ""
            s.start()

    async def idle_loop(self) -> None:
        """Stop on-demand servers that had no request for their idle_timeout."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            models = self.daemon.loaded.manifest.models  # read anew: reloads replace it
            for s in list(self.daemon.servers.values()):
                spec = models.get(s.launch.models[0])
                limit = spec.idle_timeout if spec is not None else None
                if (
                    s.on_demand
                    and limit is not None
                    and s.state == State.READY
                    and s.in_flight == 0
                    and now - s.last_used >= limit
                ):
                    await s.stop()
                    s.set_state(State.STOPPED, f"idle for {limit:g}s")


class ModelCollector:
    """Per-model metrics for the gateway's /metrics, read from the daemon on scrape."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "llmsup_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        ready = GaugeMetricFamily("llmsup_model_ready", "1 when READY", labels=["model"])
        restarts = CounterMetricFamily(
            "llmsup_model_restarts", "Restarts since the daemon started", labels=["model"]
        )
        latency = GaugeMetricFamily(
            "llmsup_model_health_latency_seconds", "Last health probe latency", labels=["model"]
        )
        gpu = GaugeMetricFamily(
            "llmsup_model_gpu_memory_bytes",
            "GPU memory held by the model's processes",
            labels=["model", "gpu"],
        )
        for s in self.daemon.servers.values():
            for model in s.launch.models:
                for st in State:
                    state.add_metric([model, st.value], 1.0 if s.state == st else 0.0)
                ready.add_metric([model], 1.0 if s.state == State.READY else 0.0)
                restarts.add_metric([model], float(s.tracker.total))
                if s.latency is not None:
                    latency.add_metric([model], s.latency)
                for index, held in s.gpu_memory.items():
                    gpu.add_metric([model, str(index)], float(held))
        yield from (state, ready, restarts, latency, gpu)
