"""The one place where a server's life (`machine.step`) meets the world.

A `Runner` feeds events to the machine one at a time, from a queue, and turns
the commands it returns into effects through injected ports: a clock, a
launcher (processes: `llmsup.process`), a prober (HTTP: `llmsup.probe`), the
GPUs, the servers it starts after, and a journal (status and log lines). Each
effect runs as a task that reports back with an event; none decides anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from llmsup import backends, limits
from llmsup.probe import ProbeResult
from llmsup.state import State
from llmsup.supervise import events as ev
from llmsup.supervise.machine import Rules, step

log = logging.getLogger("llmsup")

Report = Callable[[ev.Event], None]  # how an effect reports back


class Refused(Exception):
    """A launch that retrying cannot help (not found, port held, a secret unreadable)."""


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class Launcher(Protocol):
    """One server's processes (`llmsup.process` holds the contract)."""

    async def prepare(self) -> None:
        """Read secrets, find the executable, clear the port of our own leftovers.
        Raises Refused, or OSError when descriptors run out."""

    async def spawn(self, on_line: Callable[[str], None]) -> int:
        """Start the server; its pid. Raises Refused, or OSError (descriptors)."""
        ...

    async def exited(self) -> int:
        """The exit status of the process `spawn` started (negative: a signal)."""
        ...

    async def stop_tree(self, grace: float) -> None:
        """SIGTERM to every member, `grace`, then kill; return when none is left."""


class Prober(Protocol):
    async def ready(self) -> ProbeResult: ...

    async def health(self) -> ProbeResult: ...

    async def deep(self) -> ProbeResult: ...

    async def post_start(self, progress: Callable[[str], None]) -> str | None:
        """The backend's steps once the port answers; None when done, else why not."""
        ...


class Gpus(Protocol):
    async def short(self) -> str | None:
        """None when the GPUs have the memory the server needs, else what holds it."""
        ...


class Neighbours(Protocol):
    async def wait_predecessors(self, busy: Callable[[list[str]], None]) -> None:
        """Return once no server this one starts after is starting; call `busy`
        with their names meanwhile."""


class Journal(Protocol):
    def note(self, text: str, level: int) -> None: ...

    def publish(self, before: ev.Life, after: ev.Life) -> None:
        """The life changed: status, listeners, systemd."""


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


READY_PAUSE = (0.05, 0.01, 1.0)  # first pause between readiness probes, after a wake, cap


class Runner:
    """Drives one server's machine until it is STOPPED or FAILED."""

    def __init__(
        self,
        name: str,
        backend: str,
        rules: Callable[[], Rules],
        *,
        clock: Clock,
        launcher: Launcher,
        prober: Prober,
        gpus: Gpus,
        neighbours: Neighbours,
        journal: Journal,
        rand: random.Random,
    ) -> None:
        self.name = name
        self.backend = backends.get(backend)  # what its log lines say
        self.rules = rules
        self.clock = clock
        self.launcher = launcher
        self.prober = prober
        self.gpus = gpus
        self.neighbours = neighbours
        self.journal = journal
        self.rand = rand
        self.life = ev.Life()
        # Each event with the epoch of the effect that reported it (None: from outside).
        self._queue: asyncio.Queue[tuple[int | None, ev.Event] | BaseException] = asyncio.Queue()
        self._epoch = 0  # Abandon begins the next: reports of the effects before are dropped
        self._running = False
        self._waiters: list[tuple[Callable[[ev.Life], bool], asyncio.Future[None]]] = []
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._effects: set[asyncio.Task[None]] = set()  # cancelled when the process ends
        self._keep: set[asyncio.Task[None]] = set()  # spawn and stop: never cancelled
        self._wake = asyncio.Event()  # the server's last line before it listens

    def post(self, event: ev.Event) -> None:
        """An event from outside the effects (a request, a log line, a timer)."""
        self._queue.put_nowait((None, event))

    async def restart(self) -> None:
        """Restart while running (`Restart`): return once the fresh start is under
        way (the old tree gone), or once the run has ended (a stop asked meanwhile)."""
        starts = self.life.starts
        self.post(ev.Restart())
        await self.until(lambda life: life.starts > starts)

    async def until(self, done: Callable[[ev.Life], bool]) -> None:
        """Return once `done(life)` holds, or once the run has ended."""
        if not self._running or done(self.life):
            return
        waiter = (done, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter[1]
        finally:
            self._waiters.remove(waiter)

    async def run(self, first: ev.Event) -> None:
        """Feed `first`, then every event the effects report, until the life rests."""
        while not self._queue.empty():  # reports of the last run's effects, too late
            self._queue.get_nowait()
        self.post(first)
        self._running = True
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                epoch, event = item
                if epoch is not None and epoch != self._epoch:
                    continue  # an abandoned effect's report
                self.feed(event)
                if self.resting:
                    return
        except Exception as e:  # a bug must not leave a model unsupervised in silence
            log.exception("supervising %s failed", self.name)
            await self._crashed(f"internal error: {e!r} (see the daemon's log)")
        finally:
            self._running = False
            self._cancel(self._effects)
            self._cancel(set(self._timers.values()))
            self._timers.clear()
            self._settle()

    async def _crashed(self, reason: str) -> None:
        self._cancel(self._effects)
        if self.life.pid is not None or self.life.spawning:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._keep, return_exceptions=True)
                await self.launcher.stop_tree(self.rules().stop_timeout)
        before = self.life
        self.life = replace(
            before, state=State.FAILED, detail=reason, reason=reason, pid=None, spawning=False
        )
        self.journal.publish(before, self.life)

    @property
    def resting(self) -> bool:
        life = self.life
        return life.state in (State.STOPPED, State.FAILED) and not life.spawning

    def feed(self, event: ev.Event) -> None:
        before = self.life
        self.life, commands = step(before, event, self.clock.now(), self.rules(), self.rand)
        for c in commands:
            self._do(c)
        self.journal.publish(before, self.life)
        self._settle()

    def _settle(self) -> None:
        for done, fut in self._waiters:
            if not fut.done() and (not self._running or done(self.life)):
                fut.set_result(None)

    # ------------------------------------------------------------ commands

    def _do(self, c: ev.Command) -> None:
        match c:
            case ev.Note(text=text, level=level):
                self.journal.note(text, level)
            case ev.SetTimer(name=name, delay=delay):
                self._cancel_timer(name)
                self._timers[name] = asyncio.create_task(self._timer(name, delay))
            case ev.CancelTimer(name=name):
                self._cancel_timer(name)
            case ev.CheckPredecessors():
                self._effect(self._predecessors)
            case ev.Prepare():
                self._effect(self._prepare)
            case ev.CheckGpu():
                self._effect(self._check_gpu)
            case ev.Spawn():
                self._effect(self._spawn, keep=True)
            case ev.WatchExit():
                self._effect(self._watch_exit)
            case ev.AwaitReady():
                self._effect(self._await_ready)
            case ev.RunPostStart():
                self._effect(self._post_start)
            case ev.Probe(deep=deep):
                self._effect(lambda report: self._probe(report, deep))
            case ev.StopTree(grace=grace):
                self._cancel(self._effects)
                self._effect(lambda report: self._stop_tree(report, grace), keep=True)
            case ev.Abandon():
                self._epoch += 1
                self._cancel(self._effects)

    def _effect(self, work: Callable[[Report], Awaitable[None]], keep: bool = False) -> None:
        """Run `work` as a task; `keep`: spawn and stop, never cancelled nor abandoned."""
        epoch = None if keep else self._epoch

        def report(event: ev.Event) -> None:
            self._queue.put_nowait((epoch, event))

        async def guarded() -> None:
            try:
                await work(report)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug: the loop reports it
                self._queue.put_nowait(e)

        tasks = self._keep if keep else self._effects
        task = asyncio.create_task(guarded())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _cancel(self, tasks: set[asyncio.Task[None]]) -> None:
        for t in list(tasks):
            t.cancel()

    def _cancel_timer(self, name: str) -> None:
        if (t := self._timers.pop(name, None)) is not None:
            t.cancel()

    # ------------------------------------------------------------ effects

    async def _timer(self, name: str, delay: float) -> None:
        await self.clock.sleep(delay)
        self._timers.pop(name, None)
        self.post(ev.Timer(name))

    async def _predecessors(self, report: Report) -> None:
        await self.neighbours.wait_predecessors(
            lambda names: report(ev.PredecessorsBusy(tuple(names)))
        )
        report(ev.PredecessorsDone())

    def _launch_error(self, e: OSError) -> ev.LaunchFailed:
        retry = limits.launch_retry(e, self.life.shortages + 1)
        if retry is None:
            raise e
        return ev.LaunchFailed(retry.detail, retry.delay)

    async def _prepare(self, report: Report) -> None:
        try:
            await self.launcher.prepare()
        except Refused as e:
            report(ev.LaunchFailed(str(e)))
        except OSError as e:
            report(self._launch_error(e))
        else:
            report(ev.Prepared())

    async def _check_gpu(self, report: Report) -> None:
        msg = await self.gpus.short()
        report(ev.GpuFree() if msg is None else ev.GpuShort(msg))

    async def _spawn(self, report: Report) -> None:
        self._wake.clear()
        try:
            pid = await self.launcher.spawn(self.on_line)
        except Refused as e:
            report(ev.LaunchFailed(str(e)))
            return
        except OSError as e:
            report(self._launch_error(e))
            return
        report(ev.Started(pid))
        self._effect(self._watch_exit)

    async def _watch_exit(self, report: Report) -> None:
        report(ev.Exited(await self.launcher.exited()))

    def on_line(self, line: str) -> None:
        if hint := self.backend.exit_hint(line):
            self.post(ev.Hint(hint))
        if phase := self.backend.phase(line):
            self.post(ev.Phase(phase))
        if self.backend.listening_soon(line):
            self._wake.set()  # the server's last line before its port accepts: probe now

    async def _await_ready(self, report: Report) -> None:
        first, woken, cap = READY_PAUSE
        pause = first
        answering = False
        while True:
            self._wake.clear()  # before the probe: a line that comes during it still wakes us
            r = await self.prober.ready()
            if r.ok:
                report(ev.PortReady(r.latency))
                return
            if r.detail.startswith("HTTP") and not answering:
                answering = True
                report(ev.Answering())  # it answers 503 while it loads
            # Woken: it listens within milliseconds now, so probe often.
            pause = woken if await self._woken(pause) else min(cap, pause * 1.5)

    async def _woken(self, timeout: float) -> bool:
        if self._wake.is_set():
            return True
        wake = asyncio.create_task(self._wake.wait())
        sleep = asyncio.create_task(self.clock.sleep(timeout))
        try:
            await asyncio.wait({wake, sleep}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            sleep.cancel()
        return self._wake.is_set()

    async def _post_start(self, report: Report) -> None:
        why = await self.prober.post_start(lambda text: report(ev.Phase(text)))
        report(ev.PostStartDone() if why is None else ev.PostStartFailed(why))

    async def _probe(self, report: Report, deep: bool) -> None:
        r = await (self.prober.deep() if deep else self.prober.health())
        report(ev.Probed(r.ok, r.detail, r.latency, deep))

    async def _stop_tree(self, report: Report, grace: float) -> None:
        """Stop the tree, retrying when descriptors run out: a next launch must not
        find the old server (its EngineCore, say) still running."""
        attempt = 0
        while True:
            try:
                await self.launcher.stop_tree(grace)
                break
            except OSError as e:
                attempt += 1
                retry = limits.launch_retry(e, attempt)
                if retry is None:
                    raise
                log.warning("%s: stopping: %s", self.name, retry.detail)
                await self.clock.sleep(retry.delay)
        report(ev.TreeStopped())
