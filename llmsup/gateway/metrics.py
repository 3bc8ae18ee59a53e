"""The gateway's Prometheus metrics: its own, each model's read from the daemon, and
each remote model's upstreams."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from llmsup.control import Servers
from llmsup.gateway.upstream import RemoteReport
from llmsup.state import State

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The gateway's own: requests, in flight, upstream latency, connections."""

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
        self.upstream_requests = Counter(
            "llmsup_upstream_requests",
            "Requests a remote model's upstream answered, by status",
            ["model", "upstream", "code"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "llmsup_upstream_errors",
            "Requests to a remote model's upstream that failed, by how "
            "(refused, reset, key, unavailable, timeout, mid_response)",
            ["model", "upstream", "kind"],
            registry=r,
        )
        self.dropped = Counter(
            "llmsup_gateway_connections_dropped",
            "Client connections refused (over max_connections) or timed out",
            ["reason"],
            registry=r,
        )
        if extra is not None:
            r.register(extra)


class Upstreams(Protocol):
    """The remote models (llmsup.gateway.remote.RemoteModels), for their metrics."""

    def reports(self) -> tuple[RemoteReport, ...]: ...

    def collect(self) -> Iterator[Metric]: ...


class ModelCollector:
    """Per-model metrics for the gateway's /metrics, read from the daemon on scrape;
    a remote model's state, and its upstreams' metrics, from `remotes`."""

    def __init__(self, control: Servers, remotes: Upstreams | None = None) -> None:
        self.control = control
        self.remotes = remotes

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
        for s in self.control.views():
            for model in s.launch.models:
                for st in State:
                    state.add_metric([model, st.value], 1.0 if s.state == st else 0.0)
                ready.add_metric([model], 1.0 if s.state == State.READY else 0.0)
                restarts.add_metric([model], float(s.restarts))
                if s.latency is not None:
                    latency.add_metric([model], s.latency)
                for index, held in s.gpu_memory.items():
                    gpu.add_metric([model, str(index)], float(held))
        for r in self.remotes.reports() if self.remotes is not None else ():
            for st in State:
                state.add_metric([r.name, st.value], 1.0 if r.state == st else 0.0)
            ready.add_metric([r.name], 1.0 if r.state == State.READY else 0.0)
        yield from (state, ready, restarts, latency, gpu)
        if self.remotes is not None:
            yield from self.remotes.collect()
