"""What the control API and the gateway may ask of the daemon: the `Control` protocol,
of which the gateway needs only the `Servers` part.

The daemon implements it; `api` and `gateway` know only this module, so that none of
them imports the daemon (the import graph has no cycles: tests/test_imports.py).
Every method runs on the daemon's event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmsup.backends import Launch
from llmsup.state import State


@dataclass(frozen=True)
class ServerView:
    """One server as the gateway sees it now (a copy: it does not change under you)."""

    launch: Launch
    state: State
    detail: str  # what it is doing
    reason: str  # why it is FAILED / its last failure
    progress: str  # loading progress from its log, if any
    on_demand: bool
    active: bool  # its supervision runs: starting, up, backing off or waiting
    api_key: str | None  # the key it was started with
    restarts: int  # since the daemon started
    latency: float | None  # of the last health probe
    gpu_memory: Mapping[int, int]  # GPU index -> bytes its processes hold
    idle_timeout: float | None  # an on-demand server stops after this long unused


class Servers(Protocol):
    """The part the gateway's routing and metrics need."""

    def views(self) -> list[ServerView]:
        """Every server, in manifest order. Called per request: cheap."""
        ...

    def view(self, unit: str) -> ServerView | None: ...

    async def wait_change(self, timeout: float) -> None:
        """Return when some server changed state, or after `timeout` s."""
        ...

    def conflicts(self, unit: str, other: str) -> bool:
        """The two servers cannot run at once (an exclusive group, or their GPU memory)."""
        ...

    async def start_server(self, unit: str) -> None:
        """Start a server afresh: restart counts and last failure forgotten (returns once
        its start is under way: its view says so)."""
        ...

    async def stop_server(self, unit: str, detail: str = "") -> None:
        """Stop a server and wait until it is; `detail` says why, in its status."""
        ...


class Control(Servers, Protocol):
    """Everything: the control API's part, and the gateway's."""

    def status(self) -> dict[str, Any]:
        """The daemon and every model, as `GET /v1/status` answers."""
        ...

    async def act(self, model: str, action: str) -> list[dict[str, Any]]:
        """start | stop | restart the server of `model` (a model or server name) and
        return its status rows. Raises UnknownModel, or BadRequest for another action."""
        ...

    async def reload(self, path: Path | None = None) -> dict[str, list[str]]:
        """Apply a manifest (None: the current file again). Raises ManifestError
        (nothing changed) or DaemonError."""
        ...

    def down(self) -> None:
        """Stop every model, then the daemon (this returns at once)."""
        ...

    def leave(self) -> None:
        """Exit, leaving every model running for the next daemon to adopt (this
        returns at once)."""
        ...
