"""The gateway's settings, resolved from the manifest's `gateway:` section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.registry import Collector

from llmsup.backends.remote import Remote


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
    remotes: Sequence[Remote] = ()  # models on other hosts, their keys read
