"""One server of a daemon: its runner, and the ports that runner drives
(processes, probes, GPUs, the servers it starts after, its log)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from llmsup import backends, gpu, gpucheck, limits, probe, process
from llmsup.backends import Http, Launch
from llmsup.manifest import LoadedManifest
from llmsup.plan import Plan
from llmsup.state import State
from llmsup.supervise import events, machine, memory
from llmsup.supervise.runner import MonotonicClock, Refused, Runner

log = logging.getLogger("llmsup")


class Host(Protocol):
    """What a server needs of its daemon."""

    loaded: LoadedManifest
    plan: Plan
    cond: asyncio.Condition  # notified on every change of a server's state
    rand: random.Random
    state_dir: Path
    key: str  # the state directory's key, in every process's marker
    cgroups: Path | None
    gpu_source: gpu.GpuSource | None

    @property
    def servers(self) -> Mapping[str, Server]: ...

    @property
    def session(self) -> aiohttp.ClientSession: ...

    def log_path(self, unit: str) -> Path: ...

    def changed(self, unit: str, state: State, detail: str) -> None: ...

    async def gpu_snapshot(self) -> gpu.Snapshot | None: ...

    def instances(self) -> dict[str, str]: ...

    def owners(self) -> dict[int, str]: ...


class Server:
    """One server (one `Launch`): its runner, and the ports that runner drives
    (processes, probes, GPUs, the servers it starts after, its log)."""

    def __init__(self, daemon: Host, launch: Launch) -> None:
        self.daemon = daemon
        self.launch = launch
        self.backend = backends.get(launch.backend)
        self.state = State.STOPPED
        self.detail = ""
        self.started_at: float | None = None  # wall clock, for uptime
        self.child: process.Child | None = None
        self._remembered: memory.Memory | None = None  # as last saved for the next daemon
        self.task: asyncio.Task[None] | None = None
        self.tail: list[str] = []
        self.api_key: str | None = None  # the key the server was started with
        self.gpu_memory: dict[int, int] = {}  # GPU index -> bytes its processes hold
        self.retired = False  # replaced or removed by a reload: never starts again
        self._env: dict[str, str] = {}
        self._exe = ""
        self._rules = machine.Rules()
        self.runner = Runner(
            launch.unit,
            launch.backend,
            self.rules,
            clock=MonotonicClock(),
            launcher=self,
            prober=self,
            gpus=self,
            neighbours=self,
            journal=self,
            rand=daemon.rand,
        )

    @property
    def on_demand(self) -> bool:
        models = self.daemon.loaded.manifest.models
        present = [models[m] for m in self.launch.models if m in models]  # none: removed
        return bool(present) and all(spec.start == "on_demand" for spec in present)

    # The facts of its life, for status.
    @property
    def reason(self) -> str:
        return self.runner.life.reason

    @property
    def last_exit(self) -> str:
        return self.runner.life.last_exit

    @property
    def progress(self) -> str:
        return self.runner.life.progress

    @property
    def latency(self) -> float | None:
        return self.runner.life.latency

    @property
    def restarts(self) -> int:
        return self.runner.life.total

    @property
    def launched(self) -> bool:
        """Its launch got under way: a process, or a wait for GPUs."""
        return self.runner.life.launched

    @property
    def fatal(self) -> bool:
        """FAILED for a reason retrying cannot help (not found, port held)."""
        return self.runner.life.fatal

    def rules(self) -> machine.Rules:
        mf, unit = self.daemon.loaded.manifest, self.launch.unit
        if unit in mf.models:  # else removed by a reload, and stopping: keep the last
            h = mf.health(unit)
            self._rules = machine.Rules(
                restart=mf.restart(unit),
                failures=h.failures,
                interval=h.interval,
                startup_timeout=h.startup_timeout,
                deep_probe=h.deep_probe,
                deep_interval=h.deep_interval,
                gpu_wait=h.gpu_wait,
                stop_timeout=mf.stop_timeout(unit),
                post_start=bool(self.backend.steps(self.launch)),
            )
        return self._rules

    # -------------------------------------------------------- control

    def resume(self, remembered: memory.Memory) -> None:
        """Take up the counters (and FAILED or STOPPED) of the daemon before us."""
        self._remembered = remembered
        self.runner.life = remembered.life(*memory.now_pair())
        life = self.runner.life
        self.set_state(life.state, life.detail)

    def adopt(self, child: process.Child) -> None:
        """Supervise a server a daemon before us started, from where it is."""
        self.child = child
        self.started_at = child.record.create_time
        age = max(0.0, time.time() - child.record.create_time)
        was_ready = self._remembered is not None and self._remembered.ready
        self.set_state(State.STARTING, f"pid {child.pid} (adopted)")
        self.task = asyncio.create_task(
            self.runner.run(events.Adopted(child.pid, age, was_ready)),
            name=f"server:{self.launch.unit}",
        )

    async def detach(self) -> None:
        """Stop supervising, leaving the server running for the next daemon."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task})
        if self.child is not None:
            await self.child.detach()

    def start(self, reset: bool = False) -> None:
        """Supervise it from now on; `reset`: forget its earlier restarts and failure."""
        if self.retired:  # e.g. a `restart` that was waiting while a reload replaced us
            return
        if self.task is None or self.task.done():
            # Busy from now on, so that servers ordered after this one wait for it
            # even before its task first runs.
            self.set_state(State.STARTING, "launching")
            self.task = asyncio.create_task(
                self.runner.run(events.Start(reset)), name=f"server:{self.launch.unit}"
            )

    async def stop(self) -> None:
        """Stop it and wait until no process of it is left (even if our caller is
        cancelled meanwhile, the stop goes on to its end)."""
        if self.task is not None and not self.task.done():
            self.runner.post(events.Stop())
            await asyncio.shield(self.task)
        self.task = None

    async def restart(self) -> None:
        """Stop its processes and start it afresh, its earlier restarts and failure
        forgotten, never resting in STOPPED; return once the old processes are gone
        and the new start is under way (or a stop asked for meanwhile has ended it)."""
        if self.retired:  # replaced or removed by a reload: never starts again
            await self.stop()
        elif self.task is None or self.task.done():
            self.start(reset=True)
        else:
            await self.runner.restart()

    def set_state(self, state: State, detail: str = "") -> None:
        changed = state != self.state or detail != self.detail
        self.state, self.detail = state, detail
        if changed:
            self.daemon.changed(self.launch.unit, state, detail)

    # -------------------------------------------------------- status

    def status(self) -> list[dict[str, Any]]:
        la = self.launch
        pid = self.child.pid if self.child and self.child.running else None
        dropped, warning = self.child.log_status() if self.child else (0, "")
        up = time.time() - self.started_at if self.started_at and self.state.running else None
        return [
            {
                "name": model,
                "unit": la.unit,
                "backend": la.backend,
                "state": self.state.value,
                "detail": self.detail,
                "pid": pid,
                "host": la.host,
                "port": la.port,
                "gpus": list(la.gpus),
                "served_names": list(la.served_names),
                "uptime": up,
                "restarts": self.restarts,
                "last_exit": self.last_exit,
                "reason": self.reason,
                "health_latency_ms": (
                    self.latency * 1000 if self.latency is not None and self.state.running else None
                ),
                "progress": self.progress if self.state.running else "",
                "log": str(self.daemon.log_path(la.unit)),
                # Output dropped from the log (a full disk): since the launch began.
                "log_dropped_bytes": dropped,
                "log_warning": warning,
                "tail": self.tail if self.state == State.FAILED else [],
                "gpu_memory": (
                    {str(k): v for k, v in self.gpu_memory.items()}
                    if self.daemon.gpu_source is not None
                    else None
                ),
                "instance": self.child.record.instance if self.child else None,
                # Its live processes (by tree and cgroup), to attribute GPU holders.
                "pids": sorted(self.child.pids | {self.child.pid}) if self.child else [],
            }
            for model in la.models
        ]

    # -------------------------------------------------------- journal (runner port)

    def publish(self, before: events.Life, after: events.Life) -> None:
        if after.progress and after.progress != before.progress:
            self.daemon.changed(self.launch.unit, after.state, after.progress)
        if after.state != before.state or after.detail != before.detail:
            self.set_state(after.state, after.detail)
        self._remember(after)

    def _remember(self, life: events.Life) -> None:
        """Save what the next daemon must know, when it changes (a full disk: said,
        and supervision goes on)."""
        mono, wall = memory.now_pair()
        now = memory.Memory.of(self.launch.unit, self.launch.fingerprint(), life, mono, wall)
        last = self._remembered
        if last is not None and replace(now, restarts=()) == replace(last, restarts=()):
            return
        try:
            memory.save(self.daemon.state_dir, now)
        except OSError as e:
            log.warning("%s: cannot save its state for the next daemon: %s", self.launch.unit, e)
        self._remembered = now

    def note(self, text: str, level: int = logging.INFO) -> None:
        """One line about this server's life (an exit, a failed probe, a stop, a
        restart and its delay) in the daemon's log and in the server's own log."""
        log.log(level, "%s: %s", self.launch.unit, text)
        path = self.daemon.log_path(self.launch.unit)
        try:
            process.append_line(path, text)
        except OSError as e:
            log.warning("%s: cannot write to %s: %s", self.launch.unit, path, e)

    # -------------------------------------------------------- neighbours (runner port)

    async def wait_predecessors(self, busy: Callable[[list[str]], None]) -> None:
        """Servers that share a GPU start one after another (the plan's `after`)."""
        before = self.daemon.plan.after.get(self.launch.unit, ())
        starting = (State.WAITING, State.WAITING_GPU, State.STARTING, State.LOADING)

        def blocking() -> list[str]:
            servers = self.daemon.servers
            return [u for u in before if u in servers and servers[u].state in starting]

        async with self.daemon.cond:
            while names := blocking():
                busy(names)
                await self.daemon.cond.wait()

    # -------------------------------------------------------- launcher (runner port)

    async def prepare(self) -> None:
        la = self.launch
        self.tail = []
        try:
            env = process.child_env(os.environ, la.resolve_env())
        except OSError as e:
            if limits.shortage(e):
                raise
            raise Refused(f"cannot read a secret: {e}") from e
        self.api_key = env.get(la.auth_env) if la.auth_env else None
        # The daemon's PATH, never the manifest's: a manifest picks a backend, not a binary.
        exe = process.find_executable(la.argv[0], os.environ)
        if exe is None:
            raise Refused(
                f"{la.argv[0]}: not found on PATH (searched: {os.environ.get('PATH', '')})"
            )
        if await asyncio.to_thread(process.port_in_use, la.host, la.port):
            # Ours from an earlier instance of this server (a stop that was cut short)?
            # Those we may stop; anyone else's we must not touch.
            prefix = f"{self.daemon.key}:{la.unit}:"
            stale = await asyncio.to_thread(process.marked_with, prefix)
            if stale:
                log.warning("%s: stopping %d leftover process(es)", la.unit, len(stale))
                await process.terminate(lambda: process.marked_with(prefix), 5.0)
        if await asyncio.to_thread(process.port_in_use, la.host, la.port):
            holder = await asyncio.to_thread(process.port_holder, la.port)
            raise Refused(
                f"port {la.port} on {la.host} is held by {holder}; "
                "stop that process or change the model's port"
            )
        self._env, self._exe = env, exe

    async def spawn(self, on_line: Callable[[str], None]) -> int:
        la = self.launch
        mf = self.daemon.loaded.manifest
        logs = process.LogSpec(
            self.daemon.log_path(la.unit), mf.defaults.log.max_size, mf.defaults.log.backups
        )
        try:
            child = await process.spawn(
                la.unit,
                [self._exe, *la.argv[1:]],
                self._env,
                self.daemon.key,
                logs,
                on_line,
                state_dir=self.daemon.state_dir,
                cgroups=self.daemon.cgroups,
                fingerprint=la.fingerprint(),
            )
        except OSError as e:
            if limits.shortage(e):
                raise
            raise Refused(f"cannot start {self._exe}: {e}") from e
        self.child = child
        self.started_at = time.time()
        process.save_record(self.daemon.state_dir, child.record)
        return child.pid

    async def exited(self) -> int:
        assert self.child is not None
        return await self.child.exited()

    async def stop_tree(self, grace: float) -> None:
        """Stop the whole tree of the current process and forget it."""
        child = self.child
        if child is None:
            return
        await process.stop(child.record, grace, child)
        self.tail = list(child.tail)
        await child.close()
        process.drop_record(self.daemon.state_dir, child.record)
        self.child = None

    # -------------------------------------------------------- GPUs (runner port)

    async def short(self) -> str | None:
        """Start only into GPUs with the free memory this server will ask for:
        a predecessor's memory is released late, orphans or other jobs may hold it."""
        daemon = self.daemon
        snap = await daemon.gpu_snapshot()
        if snap is None:
            return None
        missing = gpucheck.short(gpucheck.needs(daemon.loaded, self.launch, snap), snap)
        if not missing:
            return None
        return await asyncio.to_thread(
            gpucheck.waiting_message,
            missing,
            snap,
            daemon.instances(),
            gpucheck.with_descendants(daemon.owners()),
        )

    # -------------------------------------------------------- prober (runner port)

    @property
    def _base(self) -> str:
        return f"http://{connect_host(self.launch.host)}:{self.launch.port}"

    @property
    def _http(self) -> Http:
        return Http(self.daemon.session, self._base)

    def _headers(self) -> dict[str, str]:
        if self.launch.auth_env and self.launch.auth_env in self.launch.secrets:
            return {"Authorization": f"Bearer {self.launch.secrets[self.launch.auth_env].read()}"}
        return {}

    def _timeout(self) -> float:
        return self.daemon.loaded.manifest.health(self.launch.unit).timeout

    async def ready(self) -> probe.ProbeResult:
        url = self._base + self.launch.ready_path
        return await probe.get_ok(self.daemon.session, url, min(self._timeout(), 5.0))

    async def health(self) -> probe.ProbeResult:
        timeout, url = self._timeout(), self._base + self.launch.ready_path
        r = await probe.get_ok(self.daemon.session, url, timeout, self._headers())
        more = await self.backend.liveness(self.launch, self._http, timeout) if r.ok else None
        return r if more is None else more

    async def deep(self) -> probe.ProbeResult:
        la = self.launch
        name = la.served_names[0] if la.served_names else la.unit
        session, timeout = self.daemon.session, self._timeout()
        return await probe.completion_ok(session, self._base, name, timeout, self._headers())

    async def post_start(self, progress: Callable[[str], None]) -> str | None:
        """The backend's steps once the port answers (`Backend.post_start`)."""
        timeout = self.daemon.loaded.manifest.health(self.launch.unit).startup_timeout
        return await self.backend.post_start(self.launch, self._http, progress, timeout)


def connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
