"""The runner carrying out the machine's commands through fake ports: a fake
clock that jumps to the next timer, fake processes that exit when told to."""

from __future__ import annotations

import asyncio
import errno
import heapq
import logging
import random
from collections.abc import Callable

from llmsup.manifest import Restart
from llmsup.probe import ProbeResult
from llmsup.state import State
from llmsup.supervise import events as ev
from llmsup.supervise import machine as m
from llmsup.supervise.runner import Refused, Runner

OK = ProbeResult(True, 0.01, "HTTP 200")


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


class FakeClock:
    """Time stands still until every task waits; then it jumps to the next timer."""

    def __init__(self) -> None:
        self.t = 0.0
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._n = 0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._n += 1
        heapq.heappush(self._waiters, (self.t + seconds, self._n, fut))
        await fut

    async def run_until(self, done: Callable[[], bool], jumps: int = 10_000) -> None:
        for _ in range(jumps):
            for _ in range(50):  # let every task that can run, run
                await asyncio.sleep(0)
            if done():
                return
            self._waiters = [w for w in self._waiters if not w[2].done()]
            heapq.heapify(self._waiters)
            assert self._waiters, "nothing left to happen"
            at, _, fut = heapq.heappop(self._waiters)
            self.t = max(self.t, at)
            fut.set_result(None)
        raise AssertionError(f"not done after {jumps} timers")


class FakeServer:
    """Every port of a runner, scripted: processes are pids and futures."""

    def __init__(self) -> None:
        self.prepare_errors: list[BaseException] = []
        self.health_results: list[ProbeResult | BaseException] = []
        self.spawned: list[int] = []
        self.stopped: list[int] = []
        self.notes: list[str] = []
        self.states: list[tuple[State, str]] = []
        self.gpu_messages: list[str] = []  # what holds the GPUs, one per look
        self.gpu_gate: asyncio.Future[None] | None = None  # a look waits for it
        self.calls: list[str] = []  # prepare, look (at the GPUs), spawn: in order
        self.spawn_gate: asyncio.Future[None] | None = None  # a spawn waits for it
        self._exit: asyncio.Future[int] | None = None

    # launcher
    async def prepare(self) -> None:
        self.calls.append("prepare")
        if self.prepare_errors:
            raise self.prepare_errors.pop(0)

    async def spawn(self, on_line: Callable[[str], None]) -> int:
        if self.spawn_gate is not None:
            await self.spawn_gate
        self.calls.append("spawn")
        self.spawned.append(100 + len(self.spawned))
        self._exit = asyncio.get_running_loop().create_future()
        return self.spawned[-1]

    async def exited(self) -> int:
        assert self._exit is not None
        return await self._exit

    def crash(self, code: int = 1) -> None:
        assert self._exit is not None
        self._exit.set_result(code)

    async def stop_tree(self, grace: float) -> None:
        self.stopped.append(self.spawned[-1])
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(-15)

    # prober
    async def ready(self) -> ProbeResult:
        return OK

    async def health(self) -> ProbeResult:
        r = self.health_results.pop(0) if self.health_results else OK
        if isinstance(r, BaseException):
            raise r
        return r

    async def deep(self) -> ProbeResult:
        return OK

    async def post_start(self, progress: Callable[[str], None]) -> str | None:
        return None

    # GPUs, neighbours, journal
    async def short(self) -> str | None:
        self.calls.append("look")
        if self.gpu_gate is not None:
            await self.gpu_gate
        return self.gpu_messages.pop(0) if self.gpu_messages else None

    async def wait_predecessors(self, busy: Callable[[list[str]], None]) -> None:
        return None

    def note(self, text: str, level: int = logging.INFO) -> None:
        self.notes.append(text)

    def publish(self, before: ev.Life, after: ev.Life) -> None:
        if (after.state, after.detail) != (before.state, before.detail):
            self.states.append((after.state, after.detail))


def runner_for(
    server: FakeServer, clock: FakeClock, rules: m.Rules, backend: str = "vllm"
) -> Runner:
    return Runner(
        "unit",
        backend,
        lambda: rules,
        clock=clock,
        launcher=server,
        prober=server,
        gpus=server,
        neighbours=server,
        journal=server,
        rand=NoJitter(),
    )


def test_a_crash_loop_through_the_runner_ends_failed_with_every_tree_stopped() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        policy = Restart(policy="always", backoff_initial=1.0, max_restarts=3)
        runner = runner_for(server, clock, m.Rules(restart=policy))
        task = asyncio.create_task(runner.run(ev.Start()))
        for n in range(1, 5):
            await clock.run_until(lambda: runner.life.state == State.READY)
            assert len(server.spawned) == n
            server.crash(1)
            await clock.run_until(lambda: runner.life.state != State.READY)
        await clock.run_until(task.done)
        await task
        assert runner.life.state == State.FAILED
        assert "gave up after 3 restarts" in runner.life.reason
        assert server.stopped == server.spawned == [100, 101, 102, 103]
        assert clock.t == 1.0 * 3, "each crash right at READY: the streak starts anew"
        assert server.notes[-1] == f"FAILED: {runner.life.reason}"

    asyncio.run(main())


def test_stop_during_backoff_launches_nothing_more() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules(restart=Restart(backoff_initial=30.0)))
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(lambda: runner.life.state == State.READY)
        server.crash(1)
        await clock.run_until(lambda: runner.life.state == State.BACKOFF)
        runner.post(ev.Stop())
        await clock.run_until(task.done)
        assert (runner.life.state, runner.life.detail) == (State.STOPPED, "stopped")
        assert server.spawned == [100] and clock.t < 30.0
        assert server.notes[-1] == "stopped (requested)"

    asyncio.run(main())


def test_stop_when_ready_stops_the_tree_and_rests() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules())
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(lambda: runner.life.state == State.READY)
        runner.post(ev.Stop())
        await clock.run_until(task.done)
        assert server.stopped == [100]
        assert list(dict.fromkeys(s for s, _ in server.states)) == [
            State.STARTING,
            State.READY,
            State.STOPPING,
            State.STOPPED,
        ]

    asyncio.run(main())


def test_failing_health_probes_restart_the_server() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules(failures=2, interval=10.0))
        late = ProbeResult(False, 5.0, "no answer within 5s")
        server.health_results = [OK, late, OK, late, late]
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(lambda: len(server.spawned) == 2)
        assert server.stopped == [100] and clock.t == 10 * 5 + 5.0
        assert "unhealthy: 2 probes failed in a row (last: no answer within 5s)" in server.notes
        assert (State.UNHEALTHY, "1 probe(s) failed: no answer within 5s") in server.states
        runner.post(ev.Stop())
        await clock.run_until(task.done)

    asyncio.run(main())


def test_out_of_descriptors_is_retried_without_counting_a_restart() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules(restart=Restart(max_restarts=0)))
        server.prepare_errors = [OSError(errno.EMFILE, "Too many open files")] * 5
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(lambda: runner.life.state == State.READY)
        assert clock.t == 0.5 + 1 + 2 + 4 + 8
        assert runner.life.total == 0 and server.spawned == [100]
        assert any("out of file descriptors" in d for _, d in server.states)
        runner.post(ev.Stop())
        await clock.run_until(task.done)

    asyncio.run(main())


def test_a_refused_launch_fails_at_once() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules())
        server.prepare_errors = [Refused("vllm: not found on PATH")]
        await runner.run(ev.Start())
        assert (runner.life.state, runner.life.fatal) == (State.FAILED, True)
        assert server.spawned == []

    asyncio.run(main())


def test_a_bug_in_an_effect_fails_the_server_and_stops_its_tree() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules(interval=1.0))
        server.health_results = [RuntimeError("boom")]
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(task.done)
        assert runner.life.state == State.FAILED
        assert runner.life.reason == "internal error: RuntimeError('boom') (see the daemon's log)"
        assert server.stopped == [100]

    asyncio.run(main())


def test_a_runner_runs_again_after_a_stop() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        policy = Restart(max_restarts=1)
        runner = runner_for(server, clock, m.Rules(restart=policy))
        for n in (1, 2):
            task = asyncio.create_task(runner.run(ev.Start(reset=True)))
            await clock.run_until(lambda: runner.life.state == State.READY)
            server.crash(1)  # a crash in each run: the reset budget allows it
            await clock.run_until(lambda: runner.life.state == State.READY)
            runner.post(ev.Stop())
            await clock.run_until(task.done)
            assert runner.life.state == State.STOPPED
            assert len(server.spawned) == 2 * n and server.stopped == server.spawned

    asyncio.run(main())


def test_a_gpu_wait_looks_again_until_the_memory_is_free() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules(gpu_wait=60.0))
        server.gpu_messages = ["GPU 0: 20 GiB held by pid 7"] * 10
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(lambda: runner.life.state == State.READY)
        assert clock.t == 10 * m.GPU_RECHECK and server.spawned == [100]
        assert (State.WAITING_GPU, "GPU 0: 20 GiB held by pid 7") in server.states
        runner.post(ev.Stop())
        await clock.run_until(task.done)

    asyncio.run(main())


def test_a_gpu_wait_gives_up_at_its_deadline() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules(gpu_wait=5.0))
        server.gpu_messages = ["GPU 0: held"] * 1000
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(task.done)
        assert (runner.life.state, runner.life.fatal) == (State.FAILED, True)
        assert runner.life.reason == "GPU memory still held after 5s (health.gpu_wait): GPU 0: held"
        assert clock.t == 5.0 and server.spawned == []

    asyncio.run(main())


def test_a_stop_while_spawning_stops_the_process_once_it_exists() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules())
        server.spawn_gate = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(lambda: runner.life.spawning)
        runner.post(ev.Stop())
        await clock.run_until(lambda: runner.life.state == State.STOPPING)
        assert not task.done(), "the process being spawned must be stopped first"
        server.spawn_gate.set_result(None)
        await clock.run_until(task.done)
        assert server.stopped == server.spawned == [100]
        assert (runner.life.state, runner.life.pid) == (State.STOPPED, None)

    asyncio.run(main())


def test_a_restart_keeps_the_runner_running_and_returns_once_the_new_start_is_under_way() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules(stop_timeout=3.0))
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(lambda: runner.life.state == State.READY)

        async def restart() -> tuple[State, list[int]]:
            await runner.restart()
            return runner.life.state, list(server.stopped)

        restarting = asyncio.create_task(restart())
        await clock.run_until(restarting.done)
        assert restarting.result() == (State.STARTING, [100])
        await clock.run_until(lambda: runner.life.state == State.READY)
        assert not task.done() and server.spawned == [100, 101]
        assert (State.STOPPING, "restarting (pid 100)") in server.states
        assert State.STOPPED not in [s for s, _ in server.states]
        assert "restarting (requested)" in server.notes
        runner.post(ev.Stop())
        await clock.run_until(task.done)
        assert server.stopped == [100, 101]

    asyncio.run(main())


def test_a_restart_drops_what_the_abandoned_start_reports() -> None:
    """A look at the GPUs of the start before reports free memory just after the
    restart was asked: the fresh start does not spawn on it, it looks again."""

    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules(gpu_wait=60.0))
        server.gpu_messages = ["GPU 0: held"]
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(lambda: runner.life.state == State.WAITING_GPU)
        gate = server.gpu_gate = asyncio.get_running_loop().create_future()
        await clock.run_until(lambda: server.calls.count("look") == 2)  # it waits at the gate
        gate.set_result(None)  # its GpuFree is queued right behind the restart
        runner.post(ev.Restart())
        await clock.run_until(lambda: runner.life.state == State.READY)
        assert server.calls == ["prepare", "look", "look", "prepare", "look", "spawn"]
        runner.post(ev.Stop())
        await clock.run_until(task.done)

    asyncio.run(main())


def test_a_stop_during_a_restart_ends_the_run_and_the_restart_returns() -> None:
    async def main() -> None:
        clock, server = FakeClock(), FakeServer()
        runner = runner_for(server, clock, m.Rules())
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(lambda: runner.life.state == State.READY)
        restarting = asyncio.create_task(runner.restart())
        await asyncio.sleep(0)  # the restart is asked for first
        runner.post(ev.Stop())
        await clock.run_until(lambda: task.done() and restarting.done())
        assert (runner.life.state, server.spawned, server.stopped) == (State.STOPPED, [100], [100])

    asyncio.run(main())
