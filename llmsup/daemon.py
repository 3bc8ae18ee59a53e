"""The event loop: one task per server, wired to processes, probes and signals.

Each server's life is `llmsup.supervise` (a pure machine and its runner); this
module orchestrates them: the servers of a manifest, reloads, the control
socket, the gateway, signals and systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from llmsup import gpu, gpucheck, limits, process, running, systemd
from llmsup.control import ServerView
from llmsup.errors import BadRequest, DaemonError, LlmsupError, ManifestError, UnknownModel
from llmsup.gateway.host import GatewayHost, Reload
from llmsup.manifest import LoadedManifest, load_manifest
from llmsup.notify import Notifier, status_line
from llmsup.plan import Plan, plan_or_raise, untrusted_problems
from llmsup.plan import conflicts as models_conflict
from llmsup.state import State, describe_exit
from llmsup.statedir import DaemonLock, StateDir
from llmsup.supervise import memory
from llmsup.supervise.server import Server

Listener = Callable[[str, State, str], None]
GPU_POLL = 5.0  # seconds between GPU memory readings for status and metrics
log = logging.getLogger("llmsup")


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
        self.state = StateDir.named(loaded.manifest.state_dir)
        self.state_dir = self.state.path
        self.key = self.state.key
        self.rand = rand or random.Random()
        self.listener = listener
        self.servers: dict[str, Server] = {}
        self.cond = asyncio.Condition()
        self.stopping = asyncio.Event()
        self.stopped_by: int | None = None  # the signal that stopped us (SIGINT: Ctrl-C)
        self.reloading = asyncio.Lock()  # one reload at a time (SIGHUP and the socket may race)
        self.started = time.time()
        self._session: aiohttp.ClientSession | None = None
        self._lock: DaemonLock | None = None
        self.notifier = notifier or Notifier()
        self.untrusted = untrusted  # reloads refuse command backends too
        self._status_dirty = True
        # Remote models are the gateway's: it says when one's state changes.
        self.gateway = GatewayHost(self, self.key, self._conflict_pairs, self.changed)
        self._conflicts: tuple[Any, frozenset[tuple[str, str]]] | None = None  # per manifest
        self.gpu_source: gpu.GpuSource | None = None
        self.gpu_note = ""  # why there is no GPU information, if there is none
        self.snapshot: gpu.Snapshot | None = None
        self.cgroups: Path | None = None  # where each server gets a cgroup, if anywhere
        self.launches_begun = False
        self.any_ready = False
        self._records_failing = False  # saving tracked records fails (disk full)
        self.launch_failures: list[str] = []  # why no server could be launched (exit 1)
        self.leaving = False  # exit without stopping the servers (`leave`)
        # Units whose server, started by the daemon before us, exited while none ran.
        self.died_meanwhile: dict[str, int] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    def log_path(self, unit: str) -> Path:
        return self.state.log(unit)

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
        self.gateway.poke()

    # -------------------------------------------------------- lifecycle

    async def restore(self) -> dict[str, process.Record]:
        """Take up what a daemon before us left (killed, crashed, or restarted for an
        upgrade): the servers the manifest still wants unchanged and that are provably
        the processes it started are returned, to be adopted; every other launch its
        records name is stopped (changed, removed, dead, or not ours to trust), then
        cgroups of ours without a record, and marked processes no adopted server owns."""
        records = process.load_records(self.state_dir)
        wanted = {la.unit: la for la in self.plan.launches}
        adopt: dict[str, process.Record] = {}
        leftovers = []
        # One thread for all: a hop per record cost more than the checks (100 records).
        verdicts = await asyncio.to_thread(lambda: [process.verify(r) for r in records])
        for rec, alive in zip(records, verdicts, strict=True):
            la = wanted.get(rec.unit)
            why = alive
            if la is not None and rec.fingerprint != la.fingerprint():
                why = "its model changed in the manifest; replaced"
            elif la is None:
                why = "no longer in the manifest; stopped"
            elif why is None and rec.unit in adopt:
                why = "a second launch of the same model"
            if why is None:
                adopt[rec.unit] = rec
                continue
            leftovers.append(rec)
            if alive != process.NOT_RUNNING:
                log.info("%s: not adopting pid %d: %s", rec.unit, rec.pid, why)
        self.died_meanwhile = {
            rec.unit: code
            for rec in leftovers
            if rec.unit in wanted
            and rec.unit not in adopt
            and rec.fingerprint == wanted[rec.unit].fingerprint()
            and (code := process.exit_code_of(self.state_dir, rec)) is not None
        }
        await self._stop_leftovers(leftovers, list(adopt.values()))
        return adopt

    async def _stop_leftovers(
        self, records: list[process.Record], adopted: list[process.Record]
    ) -> list[int]:
        manifest = self.loaded.manifest

        async def stop(rec: process.Record) -> list[int]:
            killed = await process.stop(rec, manifest.stop_timeout(rec.unit))
            process.drop_record(self.state_dir, rec)
            return killed

        pids = [pid for killed in await asyncio.gather(*map(stop, records)) for pid in killed]
        grace = manifest.defaults.stop_timeout
        if self.cgroups is not None:
            named = {r.cgroup for r in records + adopted}
            for cg in await asyncio.to_thread(process.cgroup.leftovers, self.cgroups, named):
                orphan = process.Record("?", "?", -1, -1, 0.0, [], cgroup=str(cg))
                pids += await process.stop(orphan, grace)
        prefix, keep = self.key + ":", {r.instance for r in adopted}
        pids += await process.terminate(lambda: process.marked_with(prefix, keep=keep), grace)
        return pids

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT or `down`: every server stopped, then return."""
        from llmsup import api

        before, after = limits.raise_open_files_limit()
        if after != before:
            log.info("open files limit raised from %d to %d", before, after)
        self._lock = self.state.acquire(self.loaded.manifest.control.group)
        loop = asyncio.get_running_loop()
        runner = None
        monitor: asyncio.Task[None] | None = None
        systemd = asyncio.create_task(self._systemd_loop())
        # Orphans of our servers come back to us, and are found in our cgroups.
        process.become_subreaper()
        self.cgroups = await asyncio.to_thread(process.cgroup.prepare, self.key)
        trackers = [asyncio.create_task(process.reap_loop()), asyncio.create_task(self._track())]
        try:
            adopt = await self.restore()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True)
            )
            # Adopted servers are probed from now on: READY again within moments of our
            # start, whatever the gateway and the GPUs' first reading take.
            to_start = self._take_up(adopt)
            # Before the control socket answers: once it does, the gateway's port
            # accepts connections; and a port it cannot have stops us before any launch.
            await self.gateway.start(self.loaded.manifest, len(self.plan.launches))
            group = self.loaded.manifest.control.group
            runner = await api.serve(self, self.state.socket, group)
            self._register()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop_by, sig)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._sighup()))
            await self._init_gpus()
            monitor = asyncio.create_task(self._gpu_loop())
            for server in to_start:
                server.start()
            self.launches_begun = True
            self.gateway.poke()  # the servers it routes to, on-demand ones too
            # Ready = the control socket answers and launches are under way; a model
            # that loads for twenty minutes must not fail the unit's start.
            self.notifier.send("READY=1")
            await self.stopping.wait()
        finally:
            doing = "leaving the models running" if self.leaving else "stopping all models"
            self.notifier.send("STOPPING=1", f"STATUS={doing}")
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.gateway.stop()
            if self.leaving:  # for a next daemon to adopt: the servers run on
                await asyncio.gather(*(s.detach() for s in self.servers.values()))
            else:
                await asyncio.gather(*(s.stop() for s in self.servers.values()))
                memory.forget(self.state_dir)  # a next `up` begins with a clean slate
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
            self.state.socket.unlink(missing_ok=True)
            running.unregister(self.state)
            if self._session is not None:
                await self._session.close()
            if self._lock is not None:
                self._lock.release()
            self.notifier.close()
        if self.launch_failures:
            raise DaemonError(
                "no model could be launched, so there is nothing to supervise:\n  "
                + "\n  ".join(self.launch_failures)
                + "\nfix these and run `llmsup up` again"
            )

    def _take_up(self, adopt: dict[str, process.Record]) -> list[Server]:
        """Every server of the plan: adopted where it runs on from the daemon before
        us, FAILED or stopped where it was; the others are returned, to be started
        (on-demand ones wait)."""
        remembered = memory.load(self.state_dir)
        to_start = []
        for la in self.plan.launches:
            server = self.servers[la.unit] = Server(self, la)
            past = remembered.get(la.unit)
            if past is not None and la.unit in adopt:  # running: its counters only
                past = replace(past, state="running")
            stopped = False  # by `llmsup stop NAME`: it stays so
            if past is not None and past.fingerprint == la.fingerprint():
                if la.unit in self.died_meanwhile:
                    why = describe_exit(self.died_meanwhile[la.unit]) + " while no daemon ran"
                    past = replace(past, state="running", last_exit=why, total=past.total + 1)
                    server.note(f"{why}; restarted", logging.WARNING)
                server.resume(past)
                stopped = past.state == "stopped"
            if la.unit in adopt:
                log_path = self.log_path(la.unit)
                child = process.Child.adopt(
                    adopt[la.unit], self.state_dir, log_path, server.runner.on_line
                )
                server.adopt(child)
            elif server.state == State.STOPPED and not server.on_demand and not stopped:
                to_start.append(server)
        return to_start

    def leave(self) -> None:
        """Exit, leaving every server running for the next daemon to adopt."""
        self.leaving = True
        self.stopping.set()

    def _stop_by(self, sig: int) -> None:
        """SIGINT (Ctrl-C) stops every model; so does SIGTERM, unless systemd sends
        it to restart our unit (`systemd.on_sigterm`): then they run on."""
        if sig == signal.SIGTERM and self.stopped_by is None and self.notifier.enabled:
            asyncio.get_running_loop().create_task(self._stop_or_leave())
        else:
            self.stopping.set()
        self.stopped_by = sig

    async def _stop_or_leave(self) -> None:
        keep = False
        try:
            verdict = await asyncio.to_thread(systemd.verdict_here, systemd.on_sigterm)
            log.info("SIGTERM: %s", verdict.why)
            keep = verdict.keep and not self.stopping.is_set()
        finally:
            if keep:
                self.leave()
            else:
                self.stopping.set()

    def _register(self) -> None:
        """Let the CLI find us without a manifest (`llmsup status` after `up -f x.yaml`)."""
        try:
            running.register(self.manifest_path, self.state)
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
            elif self._status_dirty and (self.servers or self.plan.remotes):
                self._status_dirty = False
                rows = [(u, s.state.value, s.progress) for u, s in self.servers.items()]
                rows += [(r["name"], r["state"], "") for r in self.gateway.remotes()]
                self.notifier.send(f"STATUS={status_line(rows)}")
            if interval and now - last_ping >= interval:
                last_ping = now
                self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(tick)

    # -------------------------------------------------------- GPUs

    async def _init_gpus(self) -> None:
        source = gpu.NvmlSource()
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
                out.update(dict.fromkeys(s.child.pids | {s.child.pid}, s.launch.unit))
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
                        await self._save_record(child)
            await asyncio.sleep(process.TRACK_INTERVAL)

    async def _save_record(self, child: process.Child) -> None:
        """Save what tracking learnt; a full disk costs the record its news, never the
        tracking (said once, and once more when saving works again)."""
        try:
            await asyncio.to_thread(process.save, self.state_dir, child)
        except OSError as e:
            if not self._records_failing:
                log.warning("cannot save process records in %s: %s", self.state_dir, e)
            self._records_failing = True
        else:
            if self._records_failing:
                log.info("process records in %s saved again", self.state_dir)
            self._records_failing = False

    async def _gpu_loop(self) -> None:
        """Keeps each server's GPU memory (its whole process tree) for status and metrics."""
        while self.gpu_source is not None:
            snap = await self.gpu_snapshot()
            if snap is not None:
                for s in list(self.servers.values()):
                    pids = process.tree_pids(s.child.pid) | s.child.pids if s.child else set()
                    s.gpu_memory = gpu.memory_by_pids(snap, pids) if pids else {}
            await asyncio.sleep(GPU_POLL)

    def _conflict_pairs(self) -> frozenset[tuple[str, str]]:
        """The on-demand servers that cannot run together (for the gateway's swaps)."""
        # A server a reload retired is still here while it stops, its models gone.
        units = tuple(u for u, s in self.servers.items() if s.on_demand and not s.retired)
        if self._conflicts is None or self._conflicts[0] != (self.loaded, units):
            pairs = frozenset(
                (a, b) for a in units for b in units if a != b and self.conflicts(a, b)
            )
            self._conflicts = ((self.loaded, units), pairs)
        return self._conflicts[1]

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
        if not StateDir.named(loaded.manifest.state_dir).same(self.state):
            raise DaemonError("state_dir cannot change on reload; run `llmsup down` first")
        gateway = await self.gateway.prepare(loaded.manifest)  # a port it cannot have: refused
        try:
            return await self._apply(path, loaded, plan, gateway)
        except BaseException:
            self.gateway.discard(gateway)
            raise

    async def _apply(
        self, path: Path, loaded: LoadedManifest, plan: Plan, gateway: Reload
    ) -> dict[str, list[str]]:
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
            memory.forget(self.state_dir, u)
        for u in changed + added:
            self.servers[u] = Server(self, new[u])
        for u in new:
            self.servers[u].launch = new[u]
        for u in [la.unit for la in plan.launches if la.unit in changed + added]:
            if not self.servers[u].on_demand:
                self.servers[u].start()
        await self.gateway.reload(loaded.manifest, len(plan.launches), gateway)
        unchanged = [u for u in new if u not in changed and u not in added]
        return {"added": added, "removed": removed, "restarted": changed, "unchanged": unchanged}

    def server_of(self, model: str) -> Server:
        for s in self.servers.values():
            if model in s.launch.models or model == s.launch.unit:
                return s
        if any(r.name == model for r in self.plan.remotes):
            raise BadRequest(
                f"{model} is a remote model: its servers run, and stop, on other hosts"
            )
        known = ", ".join(m for s in self.servers.values() for m in s.launch.models)
        raise UnknownModel(f"no model named {model!r} (known: {known})")

    # -------------------------------------------------------- Control (llmsup.control)

    async def act(self, model: str, action: str) -> list[dict[str, Any]]:
        server = self.server_of(model)
        if action == "start":
            server.start(reset=True)
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
            restarts=s.restarts,
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

    async def start_server(self, unit: str) -> None:
        self.servers[unit].start(reset=True)

    async def stop_server(self, unit: str, detail: str = "") -> None:
        s = self.servers.get(unit)
        if s is None:
            return
        await s.stop()
        if detail:
            s.set_state(State.STOPPED, detail)

    def gateway_info(self) -> dict[str, Any] | None:
        """Where the gateway listens, and whether it asks for a key."""
        return self.gateway.info()

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
            "remotes": self.gateway.remotes(),  # models on other hosts, through the gateway
        }
