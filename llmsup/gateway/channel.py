"""The private channel between the daemon and its gateway process: a socketpair the
daemon makes and the gateway inherits, carrying length-prefixed pickled messages.

Pickle, because both ends are this package in the same interpreter and nobody else
holds the socket (it never listens anywhere); it carries the daemon's own dataclasses
(`ServerView`, `GatewayConfig`) as they are.

Daemon -> gateway: `Config`, then `Views` whenever a server changes (and `Done` after
each request, preceded by the views it produced). Gateway -> daemon: `Start`, `Stop`,
and `Upstreams` whenever a remote model's upstreams change (for `llmsup status`).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from llmsup.control import ServerView
from llmsup.gateway.config import GatewayConfig
from llmsup.gateway.upstream import RemoteReport

_LENGTH = struct.Struct("!I")


@dataclass(frozen=True)
class Config:
    config: GatewayConfig  # its extra_collector is the gateway's own


@dataclass(frozen=True)
class Views:
    views: Sequence[ServerView]
    conflicts: frozenset[tuple[str, str]]  # on-demand units that cannot run together


@dataclass(frozen=True)
class Done:
    request: int


@dataclass(frozen=True)
class Start:
    request: int
    unit: str


@dataclass(frozen=True)
class Stop:
    request: int
    unit: str
    detail: str


@dataclass(frozen=True)
class Upstreams:
    remotes: tuple[RemoteReport, ...]  # every remote model, as the gateway's probes found it


Message = Config | Views | Done | Start | Stop | Upstreams


def send(writer: asyncio.StreamWriter, message: Message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LENGTH.pack(len(data)) + data)


async def receive(reader: asyncio.StreamReader) -> Message | None:
    """The next message; None when the other end closed the channel."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        message: Message = pickle.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return message
