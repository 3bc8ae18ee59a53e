"""The daemon's side of the gateway process (llmsup.gateway.worker).

`GatewayHost` is what the daemon owns: the manifest's `gateway:` settings, the port
they name, and the process that serves it, started again when a reload changes them.
The daemon binds the gateway's port itself (a port it cannot have stops it before any
launch), then runs the gateway in a process of its own, handing it the listening
sockets and one end of a channel: every change of a server is sent to it, and its
requests to start or stop a server are carried out. Relaying thousands of chunks a
second then never delays the daemon's own loop. A gateway process that dies is
started again (with backoff) on the same sockets: connections wait in the backlog
meanwhile, and the port is never free for another program to take.

Remote models (served on other hosts) are the gateway's alone: it probes their
upstreams and tells the daemon what it finds (`channel.Upstreams`), which `status`
shows (`GatewayHost.remotes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmsup import limits, process
from llmsup.backends.remote import NAME as REMOTE
from llmsup.backends.remote import Remote
from llmsup.control import Servers
from llmsup.errors import DaemonError
from llmsup.gateway import channel
from llmsup.gateway.config import GatewayConfig
from llmsup.gateway.upstream import RemoteReport
from llmsup.manifest import gateway_file_keys
from llmsup.plan import remotes_of
from llmsup.state import State
from llmsup.supervise.server import connect_host

if TYPE_CHECKING:
    from llmsup.manifest import Manifest

log = logging.getLogger(__name__)

BACKLOG = 1024
REFRESH = 1.0  # s: latency and GPU memory (for /metrics) reach the gateway this often
SHUTDOWN = 8.0  # s: the gateway's in-flight requests get 5 s to end, then it exits
RESTART_DELAYS = (0.5, 30.0)  # first and longest wait before starting a dead gateway again
Listener = Callable[[str, State, str], None]  # a remote model's name, state, detail


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for host:port (one per address the name resolves to, as
    asyncio's create_server does). Raises OSError, none left open."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, addr) for family, _, _, _, addr in infos))
    socks: list[socket.socket] = []
    try:
        for family, addr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and len(addresses) > 1:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class GatewayProcess:
    """One gateway process at a time for `socks`, fed from `servers`."""

    def __init__(
        self,
        servers: Servers,
        config: GatewayConfig,
        socks: list[socket.socket],
        key: str,
        conflicts: Callable[[], frozenset[tuple[str, str]]],
        on_remote: Listener | None = None,
    ) -> None:
        self.servers = servers
        self.config = config
        self.socks = socks
        self.key = key  # the daemon's marker prefix: a next daemon stops what we leave
        self.conflicts = conflicts
        self.on_remote = on_remote
        self.reports: dict[str, RemoteReport] = {}  # what the running gateway last said
        self._stopping = False
        self.proc: subprocess.Popen[bytes] | None = None  # the running gateway
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._dirty = asyncio.Event()
        self._sent: channel.Views | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The gateway process's pid while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def alive(self) -> bool:
        return self.pid is not None

    async def start(self) -> None:
        await self._spawn()
        self._watch = asyncio.create_task(self._supervise())

    def poke(self) -> None:
        """A server changed: tell the gateway soon (changes that come together go as one)."""
        self._dirty.set()

    async def stop(self, close_sockets: bool = True) -> None:
        """Stop the gateway: no new connections, those in flight get a few seconds."""
        if self._watch is not None:
            self._watch.cancel()
        self._stopping = True  # the channel's tasks now fail for the closed channel
        if self._writer is not None:
            self._writer.close()  # its end of the channel: it stops listening, then exits
        if close_sockets:
            # Ours at once: once the gateway closes its own, the port refuses new
            # connections (a client tries another host) instead of queueing them
            # unanswered in the backlog until the gateway has exited.
            for sock in self.socks:
                sock.close()
        if self.proc is not None:
            try:
                await asyncio.wait_for(process.exit_status(self.proc), SHUTDOWN)
            except asyncio.TimeoutError:
                log.warning("the gateway process did not exit in %gs: killing it", SHUTDOWN)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                await process.exit_status(self.proc)
        self._end_tasks()

    # ------------------------------------------------------------ process

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        fds = (theirs.fileno(), *(s.fileno() for s in self.socks))
        try:
            self.proc = await process.spawn_helper(
                [sys.executable, "-m", "llmsup.gateway.worker", *map(str, fds)],
                process.child_env(os.environ, {}),
                f"{self.key}:@gateway:{uuid.uuid4().hex[:12]}",
                pass_fds=fds,
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self._writer = writer
        self.reports = {}  # a new gateway probes afresh
        channel.send(writer, channel.Config(self.config))
        self._publish(force=True)
        self._track(self._requests(reader, writer))
        self._track(self._publisher(writer))

    async def _supervise(self) -> None:
        delay = RESTART_DELAYS[0]
        while True:
            began = time.monotonic()
            assert self.proc is not None  # spawned before we are started
            code = await process.exit_status(self.proc)
            self._end_tasks()
            if time.monotonic() - began > 60:
                delay = RESTART_DELAYS[0]  # it ran a good while: not a crash loop
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
            log.error("the gateway process exited (%s); starting it again in %gs", how, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAYS[1])
            await self._spawn()

    def _track(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        """A channel task that failed leaves the gateway deaf or blind: start it afresh."""
        self._tasks.discard(task)
        if task.cancelled() or (e := task.exception()) is None:
            return
        if self._stopping:  # the channel we closed: the gateway ends its requests and exits
            return
        log.error("the gateway's channel failed (%r): restarting its process", e, exc_info=e)
        if (pid := self.pid) is not None:
            os.kill(pid, signal.SIGKILL)

    def _end_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------ channel

    def _publish(self, force: bool = False) -> None:
        views = channel.Views(tuple(self.servers.views()), self.conflicts())
        if self._writer is not None and (force or views != self._sent):
            channel.send(self._writer, views)
            self._sent = views

    async def _publisher(self, writer: asyncio.StreamWriter) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), REFRESH)
            self._dirty.clear()
            self._publish()
            await writer.drain()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (message := await channel.receive(reader)) is not None:
            match message:
                case channel.Start(request=n, unit=unit):
                    try:
                        await self.servers.start_server(unit)
                    finally:  # answered whatever happened: the views tell what did
                        self._done(writer, n)
                case channel.Stop(request=n, unit=unit, detail=detail):
                    # Stops take seconds: the channel goes on meanwhile.
                    self._track(self._stop_server(writer, n, unit, detail))
                case channel.Upstreams(remotes=reports):
                    self._heard(reports)

    def _heard(self, reports: tuple[RemoteReport, ...]) -> None:
        before, self.reports = self.reports, {r.name: r for r in reports}
        for r in reports:
            last = before.get(r.name)
            if self.on_remote is not None and (last is None or last.state != r.state):
                self.on_remote(r.name, r.state, r.detail)

    async def _stop_server(
        self, writer: asyncio.StreamWriter, n: int, unit: str, detail: str
    ) -> None:
        try:
            await self.servers.stop_server(unit, detail)
        finally:
            self._done(writer, n)

    def _done(self, writer: asyncio.StreamWriter, n: int) -> None:
        if writer is self._writer and not writer.is_closing():
            self._publish(force=True)  # what the request changed, before it is answered
            channel.send(writer, channel.Done(n))


@dataclass(frozen=True)
class Settings:
    """The manifest's `gateway:` section as the gateway runs it (the keys of its
    api_key_file read): a reload that leaves them equal leaves the gateway alone."""

    host: str
    port: int
    keys: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...]
    max_body: int
    start_wait: float
    max_connections: int | None
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    remotes: tuple[Remote, ...] = ()  # their keys read

    @classmethod
    def of(cls, manifest: Manifest) -> Settings | None:
        """DaemonError: a remote model's api_key_file cannot be read."""
        gw = manifest.gateway
        if gw is None:
            return None
        keys = [k.get_secret_value() for k in gw.api_keys]  # none empty: the manifest checks
        if gw.api_key_file:
            keys += gateway_file_keys(gw.api_key_file)
        return cls(
            *(gw.host, gw.port, tuple(keys), tuple(gw.aliases.items()), gw.max_body),
            *(gw.start_wait, gw.max_connections, gw.header_timeout, gw.body_timeout),
            gw.keepalive_timeout,
            tuple(_read_key(r) for r in remotes_of(manifest)),
        )

    def config(self, servers: int) -> GatewayConfig:
        """The gateway's configuration beside `servers` servers: its connections
        capped by what the open files limit leaves them (see llmsup.limits)."""
        soft = limits.open_files_limit()
        cap = limits.connection_cap(soft, servers)
        if self.max_connections is not None and self.max_connections > cap:
            log.warning(
                "gateway.max_connections %d is more than the open files limit (%d) allows "
                "with a reserve for supervision: using %d (raise LimitNOFILE)",
                *(self.max_connections, soft, cap),
            )
        return GatewayConfig(
            api_keys=self.keys,
            aliases=dict(self.aliases),
            max_body_bytes=self.max_body,
            start_wait=self.start_wait,
            max_connections=min(cap, self.max_connections or cap),
            header_timeout=self.header_timeout,
            body_timeout=self.body_timeout,
            keepalive_timeout=self.keepalive_timeout,
            remotes=self.remotes,
        )


def _read_key(r: Remote) -> Remote:
    try:
        return r.resolved()
    except OSError as e:
        file = r.api_key.file if r.api_key is not None else None
        raise DaemonError(
            f"models.{r.name}.api_key_file: cannot read {file}: {e} (a file with the key, "
            "readable by the daemon)"
        ) from e


@dataclass(frozen=True)
class Reload:
    """What a reload does to the gateway: nothing, a restart on its sockets, or a restart
    on `socks` (a new address, bound before the reload changed anything)."""

    change: bool
    keep_sockets: bool = False
    socks: list[socket.socket] | None = None


async def _bind(settings: Settings) -> list[socket.socket]:
    try:
        return await asyncio.to_thread(bind, settings.host, settings.port)
    except OSError as e:
        holder = process.port_holder(settings.port)
        raise DaemonError(
            f"the gateway cannot listen on {settings.host}:{settings.port}: {e} ({holder})"
        ) from e


class GatewayHost:
    """The daemon's gateway, if its manifest has one: its settings, port and process."""

    def __init__(
        self,
        servers: Servers,
        key: str,
        conflicts: Callable[[], frozenset[tuple[str, str]]],
        on_remote: Listener | None = None,
    ) -> None:
        self.servers = servers
        self.key = key
        self.conflicts = conflicts
        self.on_remote = on_remote  # told when a remote model's state changes
        self.settings: Settings | None = None
        self.process: GatewayProcess | None = None

    async def start(
        self, manifest: Manifest, servers: int, socks: list[socket.socket] | None = None
    ) -> None:
        """Bind the gateway's port (unless given sockets already bound) and start the
        gateway process on it. DaemonError: the port is taken."""
        self.settings = settings = Settings.of(manifest)
        if settings is None:
            return
        if socks is None:
            socks = await _bind(settings)
        self.process = GatewayProcess(
            self.servers, settings.config(servers), socks, self.key, self.conflicts, self.on_remote
        )
        await self.process.start()

    async def stop(self, keep_sockets: bool = False) -> list[socket.socket] | None:
        """Stop the gateway process; with `keep_sockets`, return its listening sockets
        open (a reload that changes the gateway's settings but not its address)."""
        gw, self.process = self.process, None
        if gw is None:
            return None
        await gw.stop(close_sockets=not keep_sockets)
        return gw.socks if keep_sockets else None

    async def prepare(self, manifest: Manifest) -> Reload:
        """Before a reload changes anything: what it will do to the gateway, with the
        new address already bound. DaemonError (and nothing changed) when it is taken."""
        old, new = self.settings, Settings.of(manifest)
        if new == old:
            return Reload(change=False)
        if new is None or (old is not None and (old.host, old.port) == (new.host, new.port)):
            return Reload(change=True, keep_sockets=new is not None)
        return Reload(change=True, socks=await _bind(new))

    async def reload(self, manifest: Manifest, servers: int, plan: Reload) -> None:
        """Apply what `prepare` made ready: the gateway started again on its sockets."""
        if plan.change:
            kept = await self.stop(keep_sockets=plan.keep_sockets)
            await self.start(manifest, servers, kept or plan.socks)

    def discard(self, plan: Reload) -> None:
        """A reload that failed after `prepare`: let go of the sockets it bound."""
        for sock in plan.socks or ():
            sock.close()

    def poke(self) -> None:
        if self.process is not None:
            self.process.poke()

    def remotes(self) -> list[dict[str, Any]]:
        """Each remote model and its upstreams, as the gateway last found them (status)."""
        if self.settings is None:
            return []
        gw = self.process
        alive = gw is not None and gw.alive
        now = time.time()
        rows = []
        for r in self.settings.remotes:
            seen = gw.reports.get(r.name) if gw is not None and alive else None
            rows.append(_remote_row(r, seen, alive, now))
        return rows

    def info(self) -> dict[str, Any] | None:
        """Where the gateway listens, and whether it asks for a key."""
        if self.settings is None:
            return None
        host, port, gw = self.settings.host, self.settings.port, self.process
        alive = gw is not None and gw.alive
        return {
            "host": host,
            "port": port,
            "url": f"http://{connect_host(host)}:{port}/v1",
            "keys_required": bool(self.settings.keys),
            "listening": alive,
            "pid": gw.pid if gw is not None else None,
        }


def _remote_row(r: Remote, seen: RemoteReport | None, alive: bool, now: float) -> dict[str, Any]:
    """A remote model's status row: its state and each upstream's, with the last error."""
    upstreams: list[dict[str, Any]]
    if seen is None:
        state = State.STARTING
        detail = "waiting for the first probes" if alive else "the gateway process is not running"
        unknown = {"state": "unknown", "error": "", "for_s": None, "error_age_s": None}
        upstreams = [{"url": url, **unknown, "latency_ms": None} for url in r.urls]
        reason = ""
    else:
        state, detail, reason = seen.state, seen.detail, seen.reason
        upstreams = [
            {
                "url": u.url,
                "state": u.state,
                "error": u.error,
                "for_s": max(0.0, now - u.since),
                "error_age_s": None if u.error_at is None else max(0.0, now - u.error_at),
                "latency_ms": None if u.latency is None else u.latency * 1000,
            }
            for u in seen.upstreams
        ]
    return {
        "name": r.name,
        "unit": r.name,
        "backend": REMOTE,
        "state": state.value,
        "detail": detail,
        "reason": reason,
        "served_names": list(r.served_names),
        "upstreams": upstreams,
    }
