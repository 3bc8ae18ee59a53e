"""The gateway process: `python -m llmsup.gateway.worker CHANNEL_FD LISTEN_FD...`.

The daemon starts it (llmsup.gateway.host) with the listening sockets already bound
and a channel (llmsup.gateway.channel) over which it learns every server's state and
asks the daemon to start or stop one; it probes the upstreams of remote models
itself (llmsup.gateway.remote) and tells the daemon what it finds. Relaying streams
then costs the daemon's event loop nothing: crash and hang detection keep their
timing under gateway load. It runs
on asyncio's own loop (uvloop measured no better: bench/gateway.py), and exits when the channel
closes (the daemon stopped or died), after the requests in flight had a few seconds
to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import replace

from llmsup.control import ServerView
from llmsup.gateway import channel
from llmsup.gateway.app import create_app, serve
from llmsup.gateway.metrics import ModelCollector
from llmsup.gateway.remote import RemoteModels
from llmsup.gateway.routing import Routing

log = logging.getLogger("llmsup.gateway")


class RemoteServers:
    """The daemon's `Servers`, as seen through the channel: views are the latest the
    daemon sent; starts and stops are requests it answers once they are done."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._views: dict[str, ServerView] = {}
        self._conflicts: frozenset[tuple[str, str]] = frozenset()
        self._changed = asyncio.Event()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)

    def views(self) -> list[ServerView]:
        return list(self._views.values())

    def view(self, unit: str) -> ServerView | None:
        return self._views.get(unit)

    async def wait_change(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def conflicts(self, unit: str, other: str) -> bool:
        return (unit, other) in self._conflicts

    async def start_server(self, unit: str) -> None:
        await self._ask(lambda n: channel.Start(n, unit))

    async def stop_server(self, unit: str, detail: str = "") -> None:
        await self._ask(lambda n: channel.Stop(n, unit, detail))

    async def _ask(self, make: Callable[[int], channel.Message]) -> None:
        n = next(self._ids)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[n] = done
        channel.send(self._writer, make(n))
        await done

    def update(self, views: channel.Views) -> None:
        self._views = {v.launch.unit: v for v in views.views}
        self._conflicts = views.conflicts
        self._changed.set()  # wakes every waiter; the next wait waits afresh
        self._changed = asyncio.Event()

    async def follow(self, reader: asyncio.StreamReader) -> None:
        """Apply what the daemon sends until it closes the channel."""
        while (message := await channel.receive(reader)) is not None:
            match message:
                case channel.Views():
                    self.update(message)
                case channel.Done(request=n):
                    if (fut := self._pending.pop(n, None)) is not None and not fut.done():
                        fut.set_result(None)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the daemon closed the gateway's channel"))


async def run(channel_fd: int, listen_fds: list[int]) -> None:
    sock = socket.socket(fileno=channel_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    first = await channel.receive(reader)
    views = await channel.receive(reader)
    if not isinstance(first, channel.Config) or not isinstance(views, channel.Views):
        return  # the daemon went away before it configured us
    servers = RemoteServers(writer)
    servers.update(views)
    remotes = RemoteModels(
        first.config.remotes, lambda reports: channel.send(writer, channel.Upstreams(reports))
    )
    routing = Routing(servers, remotes)
    config = replace(first.config, extra_collector=ModelCollector(servers, remotes))
    listening = await serve(
        create_app(routing, config), socks=[socket.socket(fileno=fd) for fd in listen_fds]
    )
    follow = asyncio.create_task(servers.follow(reader))
    tasks = {follow, asyncio.create_task(routing.idle_loop())}
    if remotes.models:
        tasks.add(asyncio.create_task(remotes.run()))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if follow not in done:
            for task in done:
                task.result()  # it failed: exit non-zero, and the daemon starts a fresh gateway
    finally:
        for task in tasks:
            task.cancel()
        await listening.cleanup()
        writer.close()


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s gateway: %(message)s")
    fds = [int(a) for a in argv]
    asyncio.run(run(fds[0], fds[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
