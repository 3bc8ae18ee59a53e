"""The event loop: one task per server, wired to processes, probes and signals.

Decisions (restart or not, how long to wait) come from `llmsup.state`; this
module only carries them out. A server's exit is awaited, never polled, so a
crash is seen at once and respawn latency is the backoff, not a loop period.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from llmsup import gpu, gpucheck, limits, probe, process, running
from llmsup.backends import Launch
from llmsup.control import ServerView
from llmsup.errors import BadRequest, DaemonError, LlmsupError, ManifestError, UnknownModel
from llmsup.manifest import LoadedManifest, gateway_file_keys, load_manifest
from llmsup.notify import Notifier, status_line
from llmsup.paths import default_state_dir, socket_path
from llmsup.plan import Plan, plan_or_raise, untrusted_problems
from llmsup.plan import conflicts as models_conflict
from llmsup.state import (
    Fail,
    Liveness,
    Respawn,
    RestartTracker,
    State,
    Stay,
    describe_exit,
    exit_hint,
    listening_soon,
    vllm_phase,
)

Listener = Callable[[str, State, str], None]
GPU_POLL = 5.0  # seconds between GPU memory readings for status and metrics
log = logging.getLogger("llmsup")


def state_dir_of(loaded: LoadedManifest) -> Path:
    sd = loaded.manifest.state_dir
    return Path(sd) if sd else default_state_dir()


@dataclass
class Outcome:
    """How one life of a server ended."""

    failed: bool
    reason: str
    fatal: bool = False  # retrying cannot help (port held, no executable)


class Server:
    """Keeps one server process (one `Launch`) alive."""

    def __init__(self, daemon: Daemon, launch: Launch) -> None:
        self.daemon = daemon
        self.launch = launch
        self.state = State.STOPPED
        self.detail = ""
        self.reason = ""  # why it is FAILED / last failure
        self.last_exit = ""
        self.progress = ""
        self.latency: float | None = None
        self.started_at: float | None = None  # wall clock, for uptime
        self.child: process.Child | None = None
        self.tracker = RestartTracker()
        self.task: asyncio.Task[None] | None = None
        self.tail: list[str] = []
        self._wake = asyncio.Event()  # set by the server's last line before it listens
        self.exit_hint = ""  # what the server's log said about its coming exit
        self.api_key: str | None = None  # the key the server was started with
        self.gpu_memory: dict[int, int] = {}  # GPU index -> bytes its processes hold
        self.retired = False  # replaced or removed by a reload: never starts again
        self.launched = False  # its launch got under way: a process, or a wait for GPUs
        self.fatal = False  # FAILED for a reason retrying cannot help (not found, port held)

    @property
    def on_demand(self) -> bool:
        models = self.daemon.loaded.manifest.models
        return all(models[m].start == "on_demand" for m in self.launch.models if m in models)

    # -------------------------------------------------------- control

    def start(self) -> None:
        if self.retired:  # e.g. a `restart` that was waiting while a reload replaced us
            return
        if self.task is None or self.task.done():
            # Busy from now on, so that servers ordered after this one wait for it
            # even before its task first runs.
            self.fatal = False
            self.set_state(State.STARTING, "launching")
            self.task = asyncio.create_task(self._run(), name=f"server:{self.launch.unit}")

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.task = None

    async def restart(self) -> None:
        await self.stop()
        self.tracker.reset()
        self.reason = ""
        self.start()

    def set_state(self, state: State, detail: str = "") -> None:
        changed = state != self.state or detail != self.detail
        self.state, self.detail = state, detail
        if changed:
            self.daemon.changed(self.launch.unit, state, detail)

    # -------------------------------------------------------- status

    def status(self) -> list[dict[str, Any]]:
        la = self.launch
        pid = self.child.proc.pid if self.child and self.child.proc.returncode is None else None
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
                "restarts": self.tracker.total,
                "last_exit": self.last_exit,
                "reason": self.reason,
                "health_latency_ms": (
                    self.latency * 1000 if self.latency is not None and self.state.running else None
                ),
                "progress": self.progress if self.state.running else "",
                "log": str(self.daemon.log_path(la.unit)),
                "tail": self.tail if self.state == State.FAILED else [],
                "gpu_memory": (
                    {str(k): v for k, v in self.gpu_memory.items()}
                    if self.daemon.gpu_source is not None
                    else None
                ),
                "instance": self.child.record.instance if self.child else None,
                # Its live processes (by tree and cgroup), to attribute GPU holders.
                "pids": sorted(self.child.pids | {self.child.proc.pid}) if self.child else [],
            }
            for model in la.models
        ]

    # -------------------------------------------------------- life

    async def _run(self) -> None:
        shortages = 0  # launches in a row that found no file descriptor free
        try:
            while True:
                await self._wait_for_predecessors()
                try:
                    if self.child is not None:  # a stop cut short for want of descriptors
                        grace = self.daemon.loaded.manifest.stop_timeout(self.launch.unit)
                        await _uncancellable(self._bury(self.child, grace))
                    outcome = await self._one_life()
                except OSError as e:  # the daemon's want of descriptors, not the model's fault
                    retry = limits.launch_retry(e, shortages + 1)
                    if retry is None:
                        raise
                    shortages += 1
                    self.set_state(State.BACKOFF, retry.detail)
                    await asyncio.sleep(retry.delay)
                    continue
                shortages = 0
                m = self.daemon.loaded.manifest
                if outcome.fatal:
                    self.reason = outcome.reason
                    self.fatal = True
                    self.note(f"FAILED: {outcome.reason}; not restarted", logging.ERROR)
                    self.set_state(State.FAILED, outcome.reason)
                    return
                policy = m.restart(self.launch.unit)
                decision = self.tracker.decide(
                    policy, time.monotonic(), outcome.failed, outcome.reason, self.daemon.rand
                )
                if isinstance(decision, Fail):
                    self.reason = decision.reason
                    self.note(f"FAILED: {decision.reason}", logging.ERROR)
                    self.set_state(State.FAILED, decision.reason)
                    return
                if isinstance(decision, Stay):
                    self.note(f"{decision.reason}; not restarted (restart policy {policy.policy})")
                    self.set_state(State.STOPPED, decision.reason)
                    return
                assert isinstance(decision, Respawn)
                restart = (
                    f"restart {len(self.tracker.times)}/{policy.max_restarts} "
                    f"in {decision.delay:.1f}s"
                )
                self.note(f"{outcome.reason}; {restart}", logging.WARNING)
                self.set_state(State.BACKOFF, f"{outcome.reason}; {restart}")
                await asyncio.sleep(decision.delay)
        except asyncio.CancelledError:
            self.note("stopped (requested)")
            self.set_state(State.STOPPED, "stopped")
            raise
        except Exception as e:  # a bug must not leave a model unsupervised in silence
            log.exception("supervising %s failed", self.launch.unit)
            self.reason = f"internal error: {e!r} (see the daemon's log)"
            self.set_state(State.FAILED, self.reason)

    async def _wait_for_predecessors(self) -> None:
        """Servers that share a GPU start one after another (the plan's `after`)."""
        before = self.daemon.plan.after.get(self.launch.unit, ())
        busy = (State.WAITING, State.WAITING_GPU, State.STARTING, State.LOADING)

        def blocking() -> list[str]:
            return [
                u
                for u in before
                if u in self.daemon.servers and self.daemon.servers[u].state in busy
            ]

        async with self.daemon.cond:
            while names := blocking():
                self.set_state(State.WAITING, f"after {', '.join(names)} (shared GPU)")
                await self.daemon.cond.wait()

    def _new_run(self) -> None:
        """Forget the facts of the run before: status shows the current run's only."""
        self.reason = ""
        self.progress = ""
        self.latency = None
        self.tail = []

    async def _one_life(self) -> Outcome:
        self._new_run()
        la = self.launch
        m = self.daemon.loaded.manifest
        try:
            env = process.child_env(os.environ, la.resolve_env())
        except OSError as e:
            if limits.shortage(e):
                raise
            return Outcome(True, f"cannot read a secret: {e}", fatal=True)
        self.api_key = env.get(la.auth_env) if la.auth_env else None
        # The daemon's PATH, never the manifest's: a manifest picks a backend, not a binary.
        exe = process.find_executable(la.argv[0], os.environ)
        if exe is None:
            return Outcome(
                True,
                f"{la.argv[0]}: not found on PATH (searched: {os.environ.get('PATH', '')})",
                fatal=True,
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
            return Outcome(
                True,
                f"port {la.port} on {la.host} is held by {holder}; "
                "stop that process or change the model's port",
                fatal=True,
            )
        waited = await self._wait_for_gpus()
        if waited is not None:
            return waited
        self.set_progress("")
        logfile = process.RotatingLog(
            self.daemon.log_path(la.unit), m.defaults.log.max_size, m.defaults.log.backups
        )
        try:
            child = await process.spawn(
                la.unit,
                [exe, *la.argv[1:]],
                env,
                self.daemon.key,
                logfile,
                self._on_line,
                state_dir=self.daemon.state_dir,
                cgroups=self.daemon.cgroups,
            )
        except OSError as e:
            logfile.close()
            if limits.shortage(e):
                raise
            return Outcome(True, f"cannot start {exe}: {e}", fatal=True)
        self.child = child
        self.launched = True
        self.exit_hint = ""
        self.started_at = time.time()
        process.save_record(self.daemon.state_dir, child.record)
        self.set_state(State.STARTING, f"pid {child.proc.pid}")
        watch = asyncio.create_task(self._ready_then_watch(child))
        exited = asyncio.create_task(child.exited())
        try:
            done, _ = await asyncio.wait({watch, exited}, return_when=asyncio.FIRST_COMPLETED)
            if exited in done:
                self.last_exit = describe_exit(exited.result())
                if self.exit_hint:
                    self.last_exit += f" ({self.exit_hint})"
                return Outcome(True, self.last_exit)  # a server is meant to run forever
            outcome = watch.result()
            self.last_exit = outcome.reason
            return outcome
        finally:
            watch.cancel()
            exited.cancel()
            self.set_state(State.STOPPING, f"pid {child.proc.pid}")
            await _uncancellable(self._bury(child, m.stop_timeout(la.unit)))

    async def _bury(self, child: process.Child, grace: float) -> None:
        """Stop the whole tree of `child` and forget it."""
        await process.stop(child.record, grace, child)
        self.tail = list(child.tail)
        await child.close()
        process.drop_record(self.daemon.state_dir, child.record)
        self.child = None

    async def _wait_for_gpus(self) -> Outcome | None:
        """Start only into GPUs with the free memory this server will ask for:
        a predecessor's memory is released late, orphans or other jobs may hold it."""
        daemon = self.daemon
        if daemon.gpu_source is None:
            return None
        limit = daemon.loaded.manifest.health(self.launch.unit).gpu_wait
        deadline = time.monotonic() + limit
        while True:
            snap = await daemon.gpu_snapshot()
            if snap is None:
                return None
            missing = gpucheck.short(gpucheck.needs(daemon.loaded, self.launch, snap), snap)
            if not missing:
                return None
            msg = await asyncio.to_thread(
                gpucheck.waiting_message,
                missing,
                snap,
                daemon.instances(),
                gpucheck.with_descendants(daemon.owners()),
            )
            if time.monotonic() >= deadline:
                return Outcome(
                    True, f"GPU memory still held after {limit:g}s (health.gpu_wait): {msg}", True
                )
            self.launched = True  # what holds the GPUs may let go: not a launch error
            self.set_state(State.WAITING_GPU, msg)
            await asyncio.sleep(0.5)

    def set_progress(self, text: str) -> None:
        if text != self.progress:
            self.progress = text
            if text:
                self.daemon.changed(self.launch.unit, self.state, text)

    def _on_line(self, line: str) -> None:
        if hint := exit_hint(self.launch.backend, line):
            self.exit_hint = hint
        if self.launch.backend == "vllm" and (phase := vllm_phase(line)):
            self.set_progress(f"{phase[0]} ({phase[1]}%)")
            if self.state == State.STARTING:  # loading, though its port is still closed
                self.set_state(State.LOADING, self.detail)
        if listening_soon(line):
            self._wake.set()  # the server's last line before its port accepts: probe now

    def note(self, text: str, level: int = logging.INFO) -> None:
        """One line about this server's life (an exit, a failed probe, a stop, a
        restart and its delay) in the daemon's log and in the server's own log."""
        log.log(level, "%s: %s", self.launch.unit, text)
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
        path = self.daemon.log_path(self.launch.unit)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:  # O_APPEND: whole lines beside the server's output
                f.write(f"--- llmsup {stamp}: {text}\n".encode())
        except OSError as e:
            log.warning("%s: cannot write to %s: %s", self.launch.unit, path, e)

    def _headers(self) -> dict[str, str]:
        if self.launch.auth_env and self.launch.auth_env in self.launch.secrets:
            return {"Authorization": f"Bearer {self.launch.secrets[self.launch.auth_env].read()}"}
        return {}

    async def _ready_then_watch(self, child: process.Child) -> Outcome:
        la = self.launch
        m = self.daemon.loaded.manifest
        health = m.health(la.unit)
        base = f"http://{_connect_host(la.host)}:{la.port}"
        session = self.daemon.session
        deadline = time.monotonic() + health.startup_timeout
        timeout_msg = f"not ready within {health.startup_timeout:g}s (health.startup_timeout)"
        started = time.monotonic()
        pause = 0.05
        while True:  # until the port answers 200 on the readiness path
            self._wake.clear()  # before the probe: a line that comes during it still wakes us
            r = await probe.get_ok(session, base + la.ready_path, min(health.timeout, 5.0))
            if r.ok:
                break
            if r.detail.startswith("HTTP") and self.state == State.STARTING:
                self.set_state(State.LOADING, f"pid {child.proc.pid}")  # answers 503 meanwhile
            if time.monotonic() > deadline:
                return Outcome(True, timeout_msg)
            try:
                await asyncio.wait_for(self._wake.wait(), pause)
                pause = 0.01  # it listens within milliseconds now: probe often
            except asyncio.TimeoutError:
                pause = min(1.0, pause * 1.5)
        self.latency = r.latency
        if la.ollama_loads:
            self.set_state(State.LOADING, f"pid {child.proc.pid}")
            try:
                await asyncio.wait_for(self._ollama_steps(base), deadline - time.monotonic())
            except (probe.StepError, aiohttp.ClientError) as e:
                return Outcome(True, str(e) or type(e).__name__)
            except asyncio.TimeoutError:
                return Outcome(True, timeout_msg)
        self.tracker.ready()
        self.set_progress("")
        self.note(f"ready after {time.monotonic() - started:.1f}s (pid {child.proc.pid})")
        self.set_state(State.READY, f"pid {child.proc.pid}")
        return await self._watch(base, child)

    async def _ollama_steps(self, base: str) -> None:
        session = self.daemon.session
        timeout = self.daemon.loaded.manifest.health(self.launch.unit).startup_timeout
        for load in self.launch.ollama_loads:
            await probe.ollama_pull(session, base, load.model, self.set_progress)
            self.set_progress(f"loading {load.model}")
            await probe.ollama_preload(session, base, load.model, load.keep_alive, timeout)
        loaded = await probe.ollama_loaded(session, base, 10.0)
        missing = [x.model for x in self.launch.ollama_loads if x.model not in loaded]
        if missing:
            raise probe.StepError(f"not in /api/ps after preload: {', '.join(missing)}")

    async def _watch(self, base: str, child: process.Child) -> Outcome:
        la = self.launch
        m = self.daemon.loaded.manifest
        session = self.daemon.session
        health = m.health(la.unit)
        live = Liveness(health.failures)
        name = la.served_names[0] if la.served_names else la.unit
        last_deep = time.monotonic()
        while True:
            await asyncio.sleep(health.interval)
            r = await probe.get_ok(session, base + la.ready_path, health.timeout, self._headers())
            if r.ok and la.ollama_loads:
                r = await self._ollama_still_loaded(base, health.timeout)
            if live.record(r.ok):
                why = f"unhealthy: {live.misses} probes failed in a row (last: {r.detail})"
                if self.exit_hint:
                    why += f" ({self.exit_hint})"
                self.note(why, logging.WARNING)
                return Outcome(True, why)
            if not r.ok:
                self.note(f"probe failed ({live.misses}/{live.threshold}): {r.detail}")
            if r.ok:
                self.latency = r.latency
            deep_due = live.deep_due(time.monotonic() - last_deep, health.deep_interval)
            if r.ok and health.deep_probe and deep_due:
                last_deep = time.monotonic()
                d = await probe.completion_ok(session, base, name, health.timeout, self._headers())
                if live.record_deep(d.ok):
                    why = (
                        f"hung: {live.deep_misses} deep probes (1-token completions) failed "
                        f"in a row while /health passed (last: {d.detail})"
                    )
                    self.note(why, logging.WARNING)
                    return Outcome(True, why)
                if not d.ok:
                    self.note(
                        f"deep probe failed ({live.deep_misses}/{live.threshold}): {d.detail}"
                    )
                    r = d
            if live.healthy:
                self.set_state(State.READY, f"pid {child.proc.pid}")
            else:
                misses = max(live.misses, live.deep_misses)
                self.set_state(State.UNHEALTHY, f"{misses} probe(s) failed: {r.detail}")

    async def _ollama_still_loaded(self, base: str, timeout: float) -> probe.ProbeResult:
        """A runner that died unloads its model: load it again, as `ollama run` would."""
        start = time.monotonic()
        try:
            loaded = await probe.ollama_loaded(self.daemon.session, base, timeout)
            for load in self.launch.ollama_loads:
                if load.model not in loaded:
                    await probe.ollama_preload(
                        self.daemon.session, base, load.model, load.keep_alive, timeout
                    )
        except (probe.StepError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            return probe.ProbeResult(False, time.monotonic() - start, str(e) or type(e).__name__)
        return probe.ProbeResult(True, time.monotonic() - start, "loaded")


async def _uncancellable(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` to its end even if we are cancelled meanwhile (a second `stop`
    must not interrupt the first one half-way and leave processes behind)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class Daemon:
    """Owns the servers of one manifest, the control socket, and the signals."""

    def __init__(
        self,
        manifest_path: Path,
        loaded: LoadedManifest,
        plan: Plan,
        *,
        listener: Listener | None = None,
        rand: random.Random | None = None,
        notifier: Notifier | None = None,
        untrusted: bool = False,
    ) -> None:
        self.manifest_path = manifest_path
        self.loaded = loaded
        self.plan = plan
        self.state_dir = state_dir_of(loaded)
        self.key = process.state_key(self.state_dir)
        self.rand = rand or random.Random()
        self.listener = listener
        self.servers: dict[str, Server] = {}
        self.cond = asyncio.Condition()
        self.stopping = asyncio.Event()
        self.stopped_by: int | None = None  # the signal that stopped us (SIGINT: Ctrl-C)
        self.reloading = asyncio.Lock()  # one reload at a time (SIGHUP and the socket may race)
        self.started = time.time()
        self._session: aiohttp.ClientSession | None = None
        self._lock_fd: int | None = None
        self.notifier = notifier or Notifier()
        self.untrusted = untrusted  # reloads refuse command backends too
        self._status_dirty = True
        self._gateway: tuple[Any, asyncio.Task[None]] | None = None  # (runner, idle loop)
        self.gpu_source: gpu.GpuSource | None = None
        self.gpu_note = ""  # why there is no GPU information, if there is none
        self.snapshot: gpu.Snapshot | None = None
        self.cgroups: Path | None = None  # where each server gets a cgroup, if anywhere
        self._gateway_config: Any = None
        self.launches_begun = False
        self.any_ready = False
        self.launch_failures: list[str] = []  # why no server could be launched (exit 1)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    @property
    def socket_path(self) -> Path:
        return socket_path(self.state_dir)

    def log_path(self, unit: str) -> Path:
        return self.state_dir / "logs" / f"{unit}.log"

    def changed(self, unit: str, state: State, detail: str) -> None:
        self._status_dirty = True
        if self.listener:
            self.listener(unit, state, detail)
        if state == State.READY:
            self.any_ready = True
        elif state == State.FAILED:
            self._none_launched()

        async def notify() -> None:
            async with self.cond:
                self.cond.notify_all()

        asyncio.get_running_loop().create_task(notify())

    # -------------------------------------------------------- lifecycle

    def _lock(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        group = self.loaded.manifest.control.group
        if group is not None:  # members of the group must reach the socket inside
            import grp

            os.chown(self.state_dir, -1, grp.getgrnam(group).gr_gid)
            os.chmod(self.state_dir, 0o750)
        fd = os.open(self.state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DaemonError(
                f"another llmsup daemon already runs on {self.state_dir} "
                "(use `llmsup reload` or `llmsup up` to hand it a manifest)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def clean_leftovers(self) -> list[int]:
        """Stop what a daemon that was killed left behind: the launches its records
        name (and their litter), cgroups of ours without a record, marked processes."""
        records = process.load_records(self.state_dir)
        manifest = self.loaded.manifest

        async def stop(rec: process.Record) -> list[int]:
            killed = await process.stop(rec, manifest.stop_timeout(rec.unit))
            process.drop_record(self.state_dir, rec)
            return killed

        pids = [pid for killed in await asyncio.gather(*map(stop, records)) for pid in killed]
        grace = manifest.defaults.stop_timeout
        if self.cgroups is not None:
            named = {r.cgroup for r in records}
            for cg in await asyncio.to_thread(process.cgroup.leftovers, self.cgroups, named):
                orphan = process.Record("?", "?", -1, -1, 0.0, [], cgroup=str(cg))
                pids += await process.stop(orphan, grace)
        pids += await process.terminate(lambda: process.marked_with(self.key + ":"), grace)
        return pids

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT or `down`: every server stopped, then return."""
        from llmsup import api

        before, after = limits.raise_open_files_limit()
        if after != before:
            log.info("open files limit raised from %d to %d", before, after)
        self._lock()
        loop = asyncio.get_running_loop()
        runner = None
        monitor: asyncio.Task[None] | None = None
        systemd = asyncio.create_task(self._systemd_loop())
        # Orphans of our servers come back to us, and are found in our cgroups.
        process.become_subreaper()
        self.cgroups = await asyncio.to_thread(process.cgroup.prepare, self.key)
        trackers = [asyncio.create_task(process.reap_loop()), asyncio.create_task(self._track())]
        try:
            await self.clean_leftovers()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True)
            )
            group = self.loaded.manifest.control.group
            runner = await api.serve(self, self.socket_path, group)
            self._register()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop_by, sig)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._sighup()))
            await self._init_gpus()
            monitor = asyncio.create_task(self._gpu_loop())
            await self._start_gateway()  # a port it cannot have stops us before any launch
            for la in self.plan.launches:
                self.servers[la.unit] = Server(self, la)
                if not self.servers[la.unit].on_demand:
                    self.servers[la.unit].start()
            self.launches_begun = True
            # Ready = the control socket answers and launches are under way; a model
            # that loads for twenty minutes must not fail the unit's start.
            self.notifier.send("READY=1")
            await self.stopping.wait()
        finally:
            self.notifier.send("STOPPING=1", "STATUS=stopping all models")
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._stop_gateway()
            await asyncio.gather(*(s.stop() for s in self.servers.values()))
            # Orphans that came back to us and that no record named.
            await process.terminate(process.strays, self.loaded.manifest.defaults.stop_timeout)
            for t in trackers:
                t.cancel()
            if self.cgroups is not None:
                process.cgroup.release(self.cgroups)
            systemd.cancel()
            if monitor is not None:
                monitor.cancel()
            if runner is not None:
                await runner.cleanup()
            self.socket_path.unlink(missing_ok=True)
            running.unregister(self.state_dir)
            if self._session is not None:
                await self._session.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            self.notifier.close()
        if self.launch_failures:
            raise DaemonError(
                "no model could be launched, so there is nothing to supervise:\n  "
                + "\n  ".join(self.launch_failures)
                + "\nfix these and run `llmsup up` again"
            )

    def _stop_by(self, sig: int) -> None:
        self.stopped_by = sig
        self.stopping.set()

    def _register(self) -> None:
        """Let the CLI find us without a manifest (`llmsup status` after `up -f x.yaml`)."""
        try:
            running.register(self.manifest_path, self.state_dir, self.socket_path)
        except (OSError, running.UnsafeRuntimeDir) as e:
            log.warning("not registered in %s: %s", running.runtime_dir(), e)

    async def _systemd_loop(self) -> None:
        """STATUS= on change, WATCHDOG=1 from this very loop (a stuck loop trips the
        watchdog), and EXTEND_TIMEOUT_USEC= while stopping models takes its time."""
        if not self.notifier.enabled:
            return
        interval = self.notifier.watchdog_interval
        tick = min(0.5, interval) if interval else 0.5
        last_ping = 0.0
        while True:
            now = time.monotonic()
            if self.stopping.is_set():
                grace = max([self.loaded.manifest.stop_timeout(u) for u in self.servers] or [0])
                self.notifier.send(f"EXTEND_TIMEOUT_USEC={int((grace + 15) * 1e6)}")
            elif self._status_dirty and self.servers:
                self._status_dirty = False
                rows = [(u, s.state.value, s.progress) for u, s in self.servers.items()]
                self.notifier.send(f"STATUS={status_line(rows)}")
            if interval and now - last_ping >= interval:
                last_ping = now
                self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(tick)

    # -------------------------------------------------------- GPUs

    async def _init_gpus(self) -> None:
        source = gpu.source_from_env()
        try:
            self.snapshot = await asyncio.to_thread(source.snapshot)
            self.gpu_source = source
        except gpu.GpuUnavailable as e:
            self.gpu_note = f"GPU checks skipped: {e}"  # `status` shows it

    async def gpu_snapshot(self) -> gpu.Snapshot | None:
        if self.gpu_source is None:
            return None
        try:
            self.snapshot = await asyncio.to_thread(self.gpu_source.snapshot)
        except gpu.GpuUnavailable as e:  # the driver went away: keep supervising
            self.gpu_note = f"GPU information unavailable: {e}"
            return None
        self.gpu_note = ""
        return self.snapshot

    def instances(self) -> dict[str, str]:
        """Current instance marker -> unit, to tell our processes from orphans."""
        return {
            s.child.record.instance: s.launch.unit
            for s in self.servers.values()
            if s.child is not None
        }

    def owners(self) -> dict[int, str]:
        """pid -> unit for every live process of our servers (by tree and cgroup,
        not by marker: vLLM's EngineCore and workers blank their environment)."""
        out: dict[int, str] = {}
        for s in self.servers.values():
            if s.child is not None:
                out.update(dict.fromkeys(s.child.pids | {s.child.proc.pid}, s.launch.unit))
        return out

    async def _track(self) -> None:
        """Snapshots of the servers' trees, saved in their records: a process that
        leaves the group and blanks its environment is still known to be ours,
        even to the next daemon if this one is killed."""
        while True:
            children = [s.child for s in self.servers.values() if s.child is not None]
            if children:
                changed = await asyncio.to_thread(process.track, children)
                current = {id(s.child) for s in self.servers.values() if s.child is not None}
                for child in changed:
                    if id(child) in current:  # not buried meanwhile (its record is gone)
                        await asyncio.to_thread(process.save, self.state_dir, child)
            await asyncio.sleep(process.TRACK_INTERVAL)

    async def _gpu_loop(self) -> None:
        """Keeps each server's GPU memory (its whole process tree) for status and metrics."""
        while self.gpu_source is not None:
            snap = await self.gpu_snapshot()
            if snap is not None:
                for s in list(self.servers.values()):
                    pids = process.tree_pids(s.child.proc.pid) | s.child.pids if s.child else set()
                    s.gpu_memory = gpu.memory_by_pids(snap, pids) if pids else {}
            await asyncio.sleep(GPU_POLL)

    def _gateway_settings(self) -> Any:
        gw = self.loaded.manifest.gateway
        if gw is None:
            return None
        keys = [k.get_secret_value() for k in gw.api_keys]  # none empty: the manifest checks
        if gw.api_key_file:
            keys += gateway_file_keys(gw.api_key_file)
        return (
            gw.host,
            gw.port,
            tuple(keys),
            tuple(gw.aliases.items()),
            gw.max_body,
            gw.start_wait,
            (gw.max_connections, gw.header_timeout, gw.body_timeout, gw.keepalive_timeout),
        )

    async def _start_gateway(self) -> None:
        from llmsup import gateway

        settings = self._gateway_settings()
        self._gateway_config = settings
        if settings is None:
            return
        host, port, keys, aliases, max_body, start_wait, timeouts = settings
        max_connections, header_timeout, body_timeout, keepalive_timeout = timeouts
        soft = limits.open_files_limit()
        cap = limits.connection_cap(soft, len(self.plan.launches))
        if max_connections is not None and max_connections > cap:
            log.warning(
                "gateway.max_connections %d is more than the open files limit (%d) allows "
                "with a reserve for supervision: using %d (raise LimitNOFILE)",
                *(max_connections, soft, cap),
            )
        routing = gateway.Routing(self)
        config = gateway.GatewayConfig(
            api_keys=keys,
            aliases=dict(aliases),
            max_body_bytes=max_body,
            start_wait=start_wait,
            extra_collector=gateway.ModelCollector(self),
            max_connections=min(cap, max_connections or cap),
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            keepalive_timeout=keepalive_timeout,
        )
        try:
            runner = await gateway.serve(gateway.create_app(routing, config), host, port)
        except OSError as e:
            holder = process.port_holder(port)
            raise DaemonError(f"the gateway cannot listen on {host}:{port}: {e} ({holder})") from e
        self._gateway = (runner, asyncio.create_task(routing.idle_loop()))

    async def _stop_gateway(self) -> None:
        if self._gateway is not None:
            runner, idle = self._gateway
            idle.cancel()
            await runner.cleanup()
            self._gateway = None

    async def _sighup(self) -> None:
        try:
            await self.reload(self.manifest_path)
        except ManifestError as e:
            log.error("reload refused: %s", e)
            if self.listener:
                for p in e.problems:
                    self.listener("reload", State.FAILED, str(p))
        except LlmsupError as e:
            log.error("reload refused: %s", e)
            if self.listener:
                self.listener("reload", State.FAILED, str(e))

    async def reload(self, path: Path | None = None) -> dict[str, list[str]]:
        """Apply a manifest (None: the current file again): restart changed servers
        only; an invalid one changes nothing.

        Reloads run one after another: two at once would each replace a changed
        server, and the first replacement would go on running unsupervised."""
        async with self.reloading:
            return await self._reload(path or self.manifest_path)

    async def _reload(self, path: Path) -> dict[str, list[str]]:
        loaded = load_manifest(path)
        plan = plan_or_raise(loaded)
        if self.untrusted and (refused := untrusted_problems(loaded)):
            raise ManifestError(refused)
        if self.snapshot is not None:
            errors = [
                p for p in gpucheck.gpu_problems(loaded, self.snapshot) if p.severity == "error"
            ]
            if errors:
                raise ManifestError(errors)
        if state_dir_of(loaded).resolve() != self.state_dir.resolve():
            raise DaemonError("state_dir cannot change on reload; run `llmsup down` first")
        old = {u: s.launch for u, s in self.servers.items()}
        new = {la.unit: la for la in plan.launches}
        removed = [u for u in old if u not in new]
        added = [u for u in new if u not in old]
        changed = [u for u in new if u in old and new[u].fingerprint() != old[u].fingerprint()]
        self.manifest_path, self.loaded, self.plan = path, loaded, plan
        self._register()
        for u in removed + changed:
            self.servers[u].retired = True
        await asyncio.gather(*(self.servers[u].stop() for u in removed + changed))
        for u in removed:
            del self.servers[u]
        for u in changed + added:
            self.servers[u] = Server(self, new[u])
        for u in new:
            self.servers[u].launch = new[u]
        for u in [la.unit for la in plan.launches if la.unit in changed + added]:
            if not self.servers[u].on_demand:
                self.servers[u].start()
        if self._gateway_settings() != self._gateway_config:
            await self._stop_gateway()
            await self._start_gateway()
        unchanged = [u for u in new if u not in changed and u not in added]
        return {"added": added, "removed": removed, "restarted": changed, "unchanged": unchanged}

    def server_of(self, model: str) -> Server:
        for s in self.servers.values():
            if model in s.launch.models or model == s.launch.unit:
                return s
        known = ", ".join(m for s in self.servers.values() for m in s.launch.models)
        raise UnknownModel(f"no model named {model!r} (known: {known})")

    # -------------------------------------------------------- Control (llmsup.control)

    async def act(self, model: str, action: str) -> list[dict[str, Any]]:
        server = self.server_of(model)
        if action == "start":
            server.tracker.reset()
            server.start()
        elif action == "stop":
            await server.stop()
        elif action == "restart":
            await server.restart()
        else:
            raise BadRequest(f"unknown action {action!r} (start, stop or restart)")
        return server.status()

    def down(self) -> None:
        self.stopping.set()

    def views(self) -> list[ServerView]:
        return [self._view(s) for s in self.servers.values()]

    def view(self, unit: str) -> ServerView | None:
        s = self.servers.get(unit)
        return self._view(s) if s is not None else None

    def _view(self, s: Server) -> ServerView:
        spec = self.loaded.manifest.models.get(s.launch.models[0])
        return ServerView(
            launch=s.launch,
            state=s.state,
            detail=s.detail,
            reason=s.reason,
            progress=s.progress,
            on_demand=s.on_demand,
            active=s.task is not None and not s.task.done(),
            api_key=s.api_key,
            restarts=s.tracker.total,
            latency=s.latency,
            gpu_memory=s.gpu_memory,
            idle_timeout=spec.idle_timeout if spec is not None else None,
        )

    async def wait_change(self, timeout: float) -> None:
        async with self.cond:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.cond.wait(), timeout)

    def conflicts(self, unit: str, other: str) -> bool:
        a, b = self.servers[unit].launch, self.servers[other].launch
        return models_conflict(self.loaded, a.models[0], b.models[0])

    def start_server(self, unit: str) -> None:
        s = self.servers[unit]
        s.tracker.reset()
        s.reason = ""
        s.start()

    async def stop_server(self, unit: str, detail: str = "") -> None:
        s = self.servers.get(unit)
        if s is None:
            return
        await s.stop()
        if detail:
            s.set_state(State.STOPPED, detail)

    def gateway_info(self) -> dict[str, Any] | None:
        """Where the gateway listens, and whether it asks for a key."""
        settings = self._gateway_config
        if settings is None:
            return None
        host, port, keys = settings[0], settings[1], settings[2]
        return {
            "host": host,
            "port": port,
            "url": f"http://{_connect_host(host)}:{port}/v1",
            "keys_required": bool(keys),
            "listening": self._gateway is not None,
        }

    def _none_launched(self) -> None:
        """Every server FAILED before any was READY, each for a reason retrying cannot
        help (executable not found, port held): stop, and exit non-zero with the reasons."""
        servers = list(self.servers.values())
        if self.any_ready or not self.launches_begun or not servers or self.stopping.is_set():
            return
        if all(s.state == State.FAILED and s.fatal and not s.launched for s in servers):
            where = [self.loaded.problem(("models", s.launch.unit), "", key=True) for s in servers]
            self.launch_failures = [f"{w}{s.reason}" for w, s in zip(where, servers, strict=True)]
            self.stopping.set()

    def launch_phase(self) -> str:
        """`pending` until some server got a process (or waits for its GPUs), `failed`
        when none could be launched (the daemon is exiting), else `under way`."""
        if self.launch_failures:
            return "failed"
        if not self.launches_begun:
            return "pending"
        starting = [s for s in self.servers.values() if not s.on_demand]
        if not starting or any(s.launched for s in starting):
            return "under way"
        if all(s.state == State.FAILED for s in starting):
            return "under way"  # for its on-demand models: the daemon goes on
        return "pending"

    def status(self) -> dict[str, Any]:
        return {
            "daemon": {
                "pid": os.getpid(),
                "manifest": str(self.manifest_path),
                "state_dir": str(self.state_dir),
                "uptime": time.time() - self.started,
            },
            "models": [row for s in self.servers.values() for row in s.status()],
            "gpu_note": self.gpu_note,
            "launch": self.launch_phase(),
            "gateway": self.gateway_info(),
        }
