"""A server's life replayed through the pure machine: events in, state and
commands out, no processes, no clock (each event carries its own `now`)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from llmsup.manifest import Restart
from llmsup.state import State
from llmsup.supervise import events as ev
from llmsup.supervise import machine as m
from llmsup.supervise.events import Life
from llmsup.supervise.machine import Rules, step


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


class MaxJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


class Replay:
    """Feeds events at given times; keeps every command the machine returned."""

    def __init__(self, rules: Rules | None = None, life: Life | None = None) -> None:
        self.rules = rules or Rules()
        self.life = life or Life()
        self.commands: list[ev.Command] = []
        self.rand: random.Random = NoJitter()

    def __call__(self, event: ev.Event, now: float = 0.0) -> list[ev.Command]:
        self.life, cmds = step(self.life, event, now, self.rules, self.rand)
        self.commands += cmds
        return cmds

    def up(self, now: float = 0.0, pid: int = 100, ready: bool = True) -> None:
        """From STOPPED (or BACKOFF's timer) to READY (or to a process that is starting)."""
        if self.state() == State.BACKOFF:
            assert self(ev.Timer("backoff"), now) == [ev.CheckPredecessors()]
        else:
            assert self(ev.Start(), now) == [ev.CheckPredecessors()]
        assert self(ev.PredecessorsDone(), now) == [ev.Prepare()]
        assert self(ev.Prepared(), now) == [ev.CheckGpu()]
        assert ev.Spawn() in self(ev.GpuFree(), now)
        assert ev.AwaitReady() in self(ev.Started(pid), now)
        if not ready:
            return
        self(ev.PortReady(0.01), now)
        assert self.state() == State.READY, self.life

    def crash(self, now: float, code: int = 1) -> list[ev.Command]:
        cmds = self(ev.Exited(code), now)
        assert ev.StopTree(self.rules.stop_timeout) in cmds
        assert self.state() == State.STOPPING
        return self(ev.TreeStopped(), now)

    def state(self) -> State:
        return self.life.state

    def notes(self) -> list[str]:
        return [c.text for c in self.commands if isinstance(c, ev.Note)]


def timer(cmds: list[ev.Command], name: str) -> float:
    delays = [c.delay for c in cmds if isinstance(c, ev.SetTimer) and c.name == name]
    assert len(delays) == 1, cmds
    return delays[0]


# ------------------------------------------------------------------ the table

# One event of each kind, and a life in each state, to walk the whole table.
SAMPLES: dict[type, ev.Event] = {
    ev.Start: ev.Start(),
    ev.Stop: ev.Stop(),
    ev.Adopted: ev.Adopted(7),
    ev.Restart: ev.Restart(),
    ev.PredecessorsBusy: ev.PredecessorsBusy(("a",)),
    ev.PredecessorsDone: ev.PredecessorsDone(),
    ev.Prepared: ev.Prepared(),
    ev.LaunchFailed: ev.LaunchFailed("no"),
    ev.GpuShort: ev.GpuShort("GPU 0 held"),
    ev.GpuFree: ev.GpuFree(),
    ev.Started: ev.Started(7),
    ev.Answering: ev.Answering(),
    ev.PortReady: ev.PortReady(0.1),
    ev.PostStartDone: ev.PostStartDone(),
    ev.PostStartFailed: ev.PostStartFailed("pull failed"),
    ev.Probed: ev.Probed(False, "HTTP 500"),
    ev.Phase: ev.Phase("loading weights (10%)"),
    ev.Hint: ev.Hint("EngineCore died"),
    ev.Exited: ev.Exited(1),
    ev.TreeStopped: ev.TreeStopped(),
    ev.Timer: ev.Timer("?"),  # named after the state below
}
TIMER_OF = {
    State.BACKOFF: "backoff",
    State.WAITING_GPU: "gpu",
    State.STARTING: "startup",
    State.LOADING: "startup",
    State.READY: "health",
    State.UNHEALTHY: "health",
}


def life_in(state: State) -> Life:
    with_pid = state in m.RUNNING or state == State.STOPPING
    ending = ev.Ending(True, "crashed") if state == State.STOPPING else None
    return Life(state=state, pid=1 if with_pid else None, ending=ending)


def test_every_event_acts_in_its_tables_states_and_nowhere_else() -> None:
    assert set(SAMPLES) == set(m.TABLE), "an event type without a sample or a table row"
    for kind, event in SAMPLES.items():
        for state in State:
            life = life_in(state)
            if kind is ev.Timer:
                event = ev.Timer(TIMER_OF.get(state, "backoff"))
            after, cmds = step(life, event, 1.0, Rules(), NoJitter())
            acted = after != life or cmds != []
            assert acted == (state in m.TABLE[kind]), (kind.__name__, state)


def test_a_timer_of_another_state_does_nothing() -> None:
    for state, name in TIMER_OF.items():
        for other in {"backoff", "gpu", "startup", "health"} - {name}:
            life = life_in(state)
            assert step(life, ev.Timer(other), 1.0, Rules(), NoJitter()) == (life, [])


# ------------------------------------------------------------------ histories


def test_a_start_goes_through_each_step_to_ready() -> None:
    r = Replay(Rules(interval=10.0, startup_timeout=60.0))
    r(ev.Start(), 0.0)
    assert (r.state(), r.life.detail) == (State.STARTING, "launching")
    r(ev.PredecessorsBusy(("a", "b")), 0.0)
    assert (r.state(), r.life.detail) == (State.WAITING, "after a, b (shared GPU)")
    assert r(ev.PredecessorsDone(), 1.0) == [ev.Prepare()]
    assert r(ev.Prepared(), 1.0) == [ev.CheckGpu()]
    assert r(ev.GpuFree(), 1.0) == [ev.CancelTimer("gpu"), ev.Spawn()]
    cmds = r(ev.Started(42), 1.0)
    assert cmds == [ev.SetTimer("startup", 60.0), ev.AwaitReady()]
    assert (r.state(), r.life.detail, r.life.launched) == (State.STARTING, "pid 42", True)
    r(ev.Phase("loading weights (10%)"), 2.0)
    assert (r.state(), r.life.progress) == (State.LOADING, "loading weights (10%)")
    cmds = r(ev.PortReady(0.02), 4.5)
    assert cmds[0] == ev.CancelTimer("startup") and timer(cmds, "health") == 10.0
    assert (r.state(), r.life.detail, r.life.progress) == (State.READY, "pid 42", "")
    assert r.life.latency == 0.02
    assert r.notes() == ["ready after 3.5s (pid 42)"]


def test_a_port_that_answers_not_yet_200_means_loading() -> None:
    r = Replay()
    r(ev.Start())
    r(ev.PredecessorsDone())
    r(ev.Prepared())
    r(ev.GpuFree())
    r(ev.Started(5))
    r(ev.Answering())
    assert (r.state(), r.life.detail) == (State.LOADING, "pid 5")


def test_post_start_steps_come_before_ready_and_their_failure_restarts() -> None:
    r = Replay(Rules(post_start=True, restart=Restart(backoff_initial=1.0)))
    r(ev.Start())
    r(ev.PredecessorsDone())
    r(ev.Prepared())
    r(ev.GpuFree())
    r(ev.Started(5))
    assert r(ev.PortReady(0.01)) == [ev.RunPostStart()]
    assert r.state() == State.LOADING
    r(ev.Phase("pulling llama3 (40%)"))
    assert r.life.progress == "pulling llama3 (40%)"
    r(ev.PostStartFailed("not in /api/ps after preload: llama3"))
    assert r.state() == State.STOPPING
    r(ev.TreeStopped(), 1.0)
    assert r.state() == State.BACKOFF
    assert r.life.detail.startswith("not in /api/ps after preload: llama3; restart 1/5 in 1.0s")


def test_crash_loop_backs_off_doubling_then_fails() -> None:
    policy = Restart(policy="always", backoff_initial=1.0, backoff_max=5.0, max_restarts=4)
    r = Replay(Rules(restart=policy))
    delays = []
    for i in range(4):
        r.up(now=float(i), ready=False)
        delays.append(timer(r.crash(float(i), code=-9), "backoff"))
        assert r.state() == State.BACKOFF
        assert r.life.detail.startswith(f"killed by SIGKILL; restart {i + 1}/4 in ")
    assert delays == [1.0, 2.0, 4.0, 5.0]
    r.up(now=4.0, ready=False)
    r.crash(4.0)
    assert r.state() == State.FAILED
    assert r.life.reason == (
        "exited with code 1; gave up after 4 restarts within 600s (restart policy max_restarts=4)"
    )
    assert (r.life.total, r.life.last_exit) == (4, "exited with code 1")
    assert r.notes()[-1] == f"FAILED: {r.life.reason}"


def test_backoff_doubles_up_to_the_cap() -> None:
    r = NoJitter()
    delays = [m.backoff_delay(n, 5, 300, r) for n in range(1, 9)]
    assert delays == [5, 10, 20, 40, 80, 160, 300, 300]


def test_jitter_is_bounded_and_never_passes_the_cap() -> None:
    assert m.backoff_delay(1, 5.0, 300.0, MaxJitter()) == pytest.approx(5.5)
    assert m.backoff_delay(3, 5.0, 300.0, MaxJitter()) == pytest.approx(22.0)
    assert m.backoff_delay(10, 5.0, 300.0, MaxJitter()) == 300.0
    assert m.backoff_delay(4, 0.0, 300.0, MaxJitter()) == 0.0
    rand = random.Random(1)
    for n in range(1, 12):
        assert 0 < m.backoff_delay(n, 1.0, 60.0, rand) <= 60.0


def test_restarts_outside_the_window_are_forgotten() -> None:
    policy = Restart(policy="always", backoff_initial=1.0, max_restarts=2, window=10.0)
    r = Replay(Rules(restart=policy))
    for now in (0.0, 1.0, 20.0, 21.0):  # never 3 within 10 s
        r.up(now)
        r.crash(now)
        assert r.state() == State.BACKOFF
    r.up(22.0)
    r.crash(22.0)
    assert r.state() == State.FAILED


def test_ready_resets_the_backoff_streak_but_not_the_window() -> None:
    policy = Restart(policy="always", backoff_initial=1.0, max_restarts=5)
    r = Replay(Rules(restart=policy))
    r.up(0.0)
    assert timer(r.crash(0.0), "backoff") == 1.0
    # The next start dies before it is READY: the streak goes on.
    r(ev.Timer("backoff"), 1.0)
    r(ev.PredecessorsDone(), 1.0)
    r(ev.Prepared(), 1.0)
    r(ev.GpuFree(), 1.0)
    r(ev.Started(2), 1.0)
    assert timer(r.crash(1.0), "backoff") == 2.0
    r.up(3.0)  # READY: the streak ends, the window still counts all three
    assert timer(r.crash(3.0), "backoff") == 1.0
    assert r.life.restarts == (0.0, 1.0, 3.0)


@pytest.mark.parametrize(
    ("policy", "code", "state"),
    [
        ("always", 0, State.BACKOFF),
        ("always", 1, State.BACKOFF),
        ("on-failure", 1, State.BACKOFF),
        ("never", 1, State.FAILED),
        ("never", 0, State.FAILED),  # a server is meant to run for ever: any exit fails
    ],
)
def test_policies_on_an_exit(policy: str, code: int, state: State) -> None:
    r = Replay(Rules(restart=Restart(policy=policy)))
    r.up()
    r.crash(1.0, code)
    assert r.state() == state


def test_a_policy_that_stays_down_on_a_clean_ending() -> None:
    # Only a stop asked for ends cleanly today, and that one never restarts; the
    # rule itself: on-failure and never leave a clean ending STOPPED.
    for policy in ("on-failure", "never"):
        life = replace(life_in(State.STOPPING), ending=ev.Ending(False, "done"))
        rules = Rules(restart=Restart(policy=policy))
        after, cmds = step(life, ev.TreeStopped(), 0.0, rules, NoJitter())
        assert (after.state, after.detail) == (State.STOPPED, "done")
        assert cmds == [ev.Note(f"done; not restarted (restart policy {policy})")]


def test_an_engine_core_death_is_named_though_the_code_is_0() -> None:
    r = Replay()
    r.up()
    r(ev.Hint("EngineCore died"))
    r.crash(1.0, code=0)
    assert r.life.last_exit == "exited with code 0 (EngineCore died)"
    r.up(10.0)
    r.crash(11.0, code=1)
    assert r.life.last_exit == "exited with code 1", "a hint lasts one run only"


def test_not_ready_in_time_is_a_failure() -> None:
    r = Replay(Rules(startup_timeout=30.0))
    r(ev.Start())
    r(ev.PredecessorsDone())
    r(ev.Prepared())
    r(ev.GpuFree())
    r(ev.Started(3))
    r(ev.Timer("startup"), 30.0)
    assert r.state() == State.STOPPING
    r(ev.TreeStopped(), 31.0)
    assert r.life.detail.startswith("not ready within 30s (health.startup_timeout); restart 1/5")


# ------------------------------------------------------------------ stops


def test_stop_before_the_process_exists_stops_at_once() -> None:
    setups: list[list[ev.Event]] = [[ev.Start()], [ev.Start(), ev.PredecessorsBusy(("a",))]]
    for setup in setups:
        r = Replay()
        for event in setup:
            r(event)
        cmds = r(ev.Stop())
        assert (r.state(), r.life.detail) == (State.STOPPED, "stopped")
        assert ev.Note("stopped (requested)") in cmds
        assert r(ev.PredecessorsDone()) == [] and r.state() == State.STOPPED


def test_stop_while_the_process_is_being_spawned_stops_it_once_it_exists() -> None:
    r = Replay(Rules(stop_timeout=7.0))
    r(ev.Start())
    r(ev.PredecessorsDone())
    r(ev.Prepared())
    r(ev.GpuFree())
    assert r(ev.Stop()) == [] and r.state() == State.STOPPING, "no tree to stop yet"
    assert r(ev.Started(9)) == [ev.StopTree(7.0)]
    assert r.state() == State.STOPPING
    r(ev.TreeStopped())
    assert (r.state(), r.life.pid) == (State.STOPPED, None)
    # The spawn failed instead: nothing to stop.
    r = Replay()
    r(ev.Start())
    r(ev.PredecessorsDone())
    r(ev.Prepared())
    r(ev.GpuFree())
    r(ev.Stop())
    r(ev.LaunchFailed("cannot start vllm: Permission denied"))
    assert (r.state(), r.life.fatal) == (State.STOPPED, False)


def test_stop_during_start_and_when_ready_stops_the_tree() -> None:
    for ready in (False, True):
        r = Replay(Rules(stop_timeout=5.0))
        if ready:
            r.up()
        else:
            r(ev.Start())
            r(ev.PredecessorsDone())
            r(ev.Prepared())
            r(ev.GpuFree())
            r(ev.Started(4))
        cmds = r(ev.Stop())
        assert cmds[-1] == ev.StopTree(5.0)
        assert {ev.CancelTimer("startup"), ev.CancelTimer("health")} <= set(cmds)
        assert r(ev.Probed(False, "HTTP 500")) == [], "a late probe result is ignored"
        assert r(ev.Exited(-15)) == [] and r.state() == State.STOPPING
        assert r(ev.TreeStopped()) == [ev.Note("stopped (requested)")]
        assert (r.state(), r.life.detail) == (State.STOPPED, "stopped")


def test_stop_during_backoff_cancels_the_restart() -> None:
    r = Replay()
    r.up()
    r.crash(1.0)
    cmds = r(ev.Stop(), 2.0)
    assert ev.CancelTimer("backoff") in cmds
    assert (r.state(), r.life.detail) == (State.STOPPED, "stopped")
    assert r(ev.Timer("backoff"), 6.0) == []


def test_stop_while_a_failed_process_is_being_stopped_wins() -> None:
    """A reload replaces a server that just crashed: the stop asked for is the
    last word, not the restart the crash would have led to."""
    r = Replay()
    r.up()
    r(ev.Exited(1))
    assert r(ev.Stop()) == [] and r.state() == State.STOPPING
    r(ev.TreeStopped())
    assert (r.state(), r.life.detail) == (State.STOPPED, "stopped")
    assert r.life.total == 0


def test_a_start_after_failed_forgets_the_restarts_only_when_asked() -> None:
    r = Replay(Rules(restart=Restart(policy="always", max_restarts=1)))
    r.up(0.0)
    r.crash(0.0)
    r.up(1.0)
    r.crash(1.0)
    assert r.state() == State.FAILED
    r(ev.Start(reset=False), 2.0)
    r(ev.PredecessorsDone(), 2.0)
    assert r.life.restarts == (0.0,) and r.life.reason == ""
    r(ev.Stop())
    r(ev.Start(reset=True), 3.0)
    assert (r.state(), len(r.life.restarts), r.life.streak) == (State.STARTING, 0, 0)
    r(ev.PredecessorsDone(), 3.0)
    r(ev.Prepared(), 3.0)
    r(ev.GpuFree(), 3.0)
    r(ev.Started(8), 3.0)
    r(ev.PortReady(0.1), 3.0)
    r.crash(4.0)
    assert r.state() == State.BACKOFF, "a fresh budget after `llmsup restart`"


# ------------------------------------------------------------------ restarts asked for


class Seen(Replay):
    """A replay that keeps every state the life passes through."""

    def __init__(self, rules: Rules | None = None) -> None:
        super().__init__(rules)
        self.states: list[State] = []

    def __call__(self, event: ev.Event, now: float = 0.0) -> list[ev.Command]:
        cmds = super().__call__(event, now)
        self.states.append(self.state())
        return cmds


def test_restart_when_ready_stops_the_tree_then_starts_afresh_without_resting() -> None:
    r = Seen(Rules(stop_timeout=7.0, restart=Restart(backoff_initial=1.0)))
    r.up(0.0, pid=41)
    r.crash(1.0)  # a restart counted, then up again
    r.up(2.0, pid=42)
    assert (len(r.life.restarts), r.life.total) == (1, 1)
    cmds = r(ev.Restart(), 3.0)
    assert cmds[0] == ev.Note("restarting (requested)")
    assert cmds[-1] == ev.StopTree(7.0)
    assert {ev.CancelTimer("health"), ev.CancelTimer("startup")} <= set(cmds)
    assert (r.state(), r.life.detail) == (State.STOPPING, "restarting (pid 42)")
    assert r(ev.Exited(-15), 3.5) == [], "the exit of a process being stopped is no failure"
    assert r(ev.TreeStopped(), 4.0) == [ev.CheckPredecessors()]
    assert (r.state(), r.life.detail, r.life.pid) == (State.STARTING, "launching", None)
    assert (r.life.restarts, r.life.streak, r.life.total) == ((), 0, 1)
    assert r.life.last_exit == "exited with code 1", "a restart asked for is no exit to report"
    assert State.STOPPED not in r.states
    assert r(ev.PredecessorsDone(), 5.0) == [ev.Prepare()]


def test_restart_mid_start_stops_the_loading_process() -> None:
    r = Seen(Rules(stop_timeout=5.0))
    r.up(0.0, pid=9, ready=False)
    r(ev.Answering())
    assert r.state() == State.LOADING
    cmds = r(ev.Restart(), 1.0)
    assert ev.CancelTimer("startup") in cmds and cmds[-1] == ev.StopTree(5.0)
    r(ev.TreeStopped(), 2.0)
    assert (r.state(), r.life.starts) == (State.STARTING, 2)
    assert State.STOPPED not in r.states


@pytest.mark.parametrize("where", [State.WAITING, State.WAITING_GPU, State.BACKOFF])
def test_restart_with_no_process_abandons_the_start_under_way(where: State) -> None:
    r = Seen(Rules(gpu_wait=60.0, restart=Restart(backoff_initial=30.0)))
    if where == State.BACKOFF:
        r.up(0.0)
        r.crash(0.0)
    else:
        r(ev.Start(), 0.0)
        r(ev.PredecessorsBusy(("a",)), 0.0)
        if where == State.WAITING_GPU:
            r(ev.PredecessorsDone(), 0.0)
            r(ev.Prepared(), 0.0)
            r(ev.GpuShort("GPU 0: held"), 0.0)
    assert r.state() == where
    cmds = r(ev.Restart(), 50.0)
    assert cmds == [
        ev.Note("restarting (requested)"),
        ev.CancelTimer("startup"),
        ev.CancelTimer("health"),
        ev.CancelTimer("gpu"),
        ev.CancelTimer("backoff"),
        ev.Abandon(),
        ev.CheckPredecessors(),
    ]
    assert (r.state(), r.life.detail, r.life.restarts) == (State.STARTING, "launching", ())
    assert State.STOPPED not in r.states
    assert r(ev.Timer("backoff"), 51.0) == [] and r(ev.Timer("gpu"), 51.0) == []
    # A fresh start: its GPU wait has its own deadline.
    r(ev.PredecessorsDone(), 100.0)
    r(ev.Prepared(), 100.0)
    r(ev.GpuShort("GPU 0: held"), 100.0)
    assert (r.state(), r.life.gpu_deadline) == (State.WAITING_GPU, 160.0)


def test_restart_while_spawning_stops_the_process_once_it_exists() -> None:
    for spawned in (True, False):
        r = Seen(Rules(stop_timeout=7.0))
        r(ev.Start())
        r(ev.PredecessorsDone())
        r(ev.Prepared())
        r(ev.GpuFree())
        assert r(ev.Restart()) == [ev.Note("restarting (requested)")]
        assert (r.state(), r.life.detail) == (State.STOPPING, "restarting")
        if spawned:
            assert r(ev.Started(9)) == [ev.StopTree(7.0)]
            assert r(ev.TreeStopped()) == [ev.CheckPredecessors()]
        else:
            assert r(ev.LaunchFailed("cannot start vllm: busy")) == [ev.CheckPredecessors()]
        assert (r.state(), r.life.pid, r.life.spawning) == (State.STARTING, None, False)
        assert State.STOPPED not in r.states


def test_restart_when_stopped_or_failed_is_a_start_with_reset() -> None:
    r = Replay(Rules(restart=Restart(policy="never")))
    assert r(ev.Restart()) == [ev.CheckPredecessors()]
    assert (r.state(), r.life.starts) == (State.STARTING, 1)
    r(ev.PredecessorsDone())
    r(ev.LaunchFailed("port 8000 on 127.0.0.1 is held by nginx (pid 1)"))
    assert (r.state(), r.life.fatal) == (State.FAILED, True)
    assert r(ev.Restart()) == [ev.CheckPredecessors()]
    assert (r.state(), r.life.fatal, r.life.reason) == (State.STARTING, False, "")


def test_a_stop_during_a_restarts_stop_wins() -> None:
    r = Seen()
    r.up(0.0, pid=5)
    r(ev.Restart(), 1.0)
    assert r(ev.Stop(), 1.5) == []
    assert (r.state(), r.life.detail) == (State.STOPPING, "pid 5")
    assert r(ev.TreeStopped(), 2.0) == [ev.Note("stopped (requested)")]
    assert (r.state(), r.life.detail) == (State.STOPPED, "stopped")
    # And a restart asked for during a stop's stop leaves it stopped.
    r.up(3.0, pid=6)
    r(ev.Stop(), 4.0)
    assert r(ev.Restart(), 4.5) == []
    r(ev.TreeStopped(), 5.0)
    assert r.state() == State.STOPPED


def test_a_second_restart_during_a_restarts_stop_is_taken_into_it() -> None:
    r = Replay()
    r.up(0.0, pid=5)
    r(ev.Restart(), 1.0)
    before = r.life
    assert r(ev.Restart(), 1.5) == [] and r.life == before
    assert r(ev.TreeStopped(), 2.0) == [ev.CheckPredecessors()]
    assert (r.state(), r.life.starts) == (State.STARTING, 2), "one start, one restart"


def test_restart_during_a_crashs_stop_starts_afresh_without_backoff() -> None:
    r = Seen(Rules(restart=Restart(backoff_initial=30.0)))
    r.up(0.0, pid=5)
    r(ev.Exited(1), 1.0)
    assert r.state() == State.STOPPING and r.life.ending is not None
    assert r(ev.Restart(), 1.5) == [ev.Note("restarting (requested)")]
    assert r.life.detail == "restarting (pid 5)"
    assert r(ev.TreeStopped(), 2.0) == [ev.CheckPredecessors()]
    assert (r.state(), r.life.total, r.life.restarts) == (State.STARTING, 0, ())
    assert r.life.last_exit == "exited with code 1"
    assert State.BACKOFF not in r.states


# ------------------------------------------------------------------ launches


def test_a_fatal_launch_error_fails_at_once_and_says_why() -> None:
    r = Replay()
    r(ev.Start())
    r(ev.PredecessorsDone())
    cmds = r(ev.LaunchFailed("port 8000 on 127.0.0.1 is held by nginx (pid 1)"))
    assert r.state() == State.FAILED and r.life.fatal and not r.life.launched
    assert cmds[0] == ev.Note(
        "FAILED: port 8000 on 127.0.0.1 is held by nginx (pid 1); not restarted", 40
    )
    r(ev.Start(reset=True))
    assert not r.life.fatal


def test_out_of_descriptors_retries_for_ever_without_counting() -> None:
    r = Replay(Rules(restart=Restart(max_restarts=1)))
    r(ev.Start())
    for i in range(200):
        r(ev.PredecessorsDone(), float(i))
        cmds = r(ev.LaunchFailed("out of file descriptors; retry", retry=30.0), float(i))
        assert cmds == [ev.SetTimer("backoff", 30.0)]
        assert r.state() == State.BACKOFF
        assert r(ev.Timer("backoff"), float(i)) == [ev.CheckPredecessors()]
    assert (r.life.shortages, r.life.total, r.life.restarts) == (200, 0, ())
    r(ev.PredecessorsDone())
    r(ev.Prepared())
    r(ev.GpuFree())
    r(ev.Started(3))
    assert r.life.shortages == 0


def test_gpu_wait_rechecks_until_free() -> None:
    r = Replay(Rules(gpu_wait=60.0))
    r(ev.Start())
    r(ev.PredecessorsDone())
    r(ev.Prepared(), 0.0)
    cmds = r(ev.GpuShort("GPU 0: 30 GiB held by pid 77"), 0.0)
    assert cmds == [ev.SetTimer("gpu", m.GPU_RECHECK)]
    assert (r.state(), r.life.detail) == (State.WAITING_GPU, "GPU 0: 30 GiB held by pid 77")
    assert r.life.launched, "a wait for GPUs counts as a launch under way"
    assert r(ev.Timer("gpu"), 0.5) == [ev.CheckGpu()]
    r(ev.GpuShort("GPU 0: 10 GiB held by pid 77"), 30.0)
    assert r.life.detail == "GPU 0: 10 GiB held by pid 77"
    assert r(ev.GpuFree(), 30.5)[-1] == ev.Spawn()
    assert r.state() == State.STARTING


def test_gpu_wait_gives_up_at_its_deadline_and_the_next_start_waits_anew() -> None:
    r = Replay(Rules(gpu_wait=60.0))
    r(ev.Start())
    r(ev.PredecessorsDone(), 100.0)
    r(ev.Prepared(), 100.0)
    r(ev.GpuShort("held"), 100.0)
    r(ev.GpuShort("held"), 159.9)
    assert r.state() == State.WAITING_GPU
    r(ev.GpuShort("held"), 160.0)
    assert (r.state(), r.life.fatal) == (State.FAILED, True)
    assert r.life.reason == "GPU memory still held after 60s (health.gpu_wait): held"
    r(ev.Start(), 200.0)
    r(ev.PredecessorsDone(), 200.0)
    r(ev.Prepared(), 200.0)
    r(ev.GpuShort("held"), 200.0)
    assert r.state() == State.WAITING_GPU


def test_stop_while_waiting_for_gpus() -> None:
    r = Replay()
    r(ev.Start())
    r(ev.PredecessorsDone())
    r(ev.Prepared())
    r(ev.GpuShort("held"))
    assert ev.CancelTimer("gpu") in r(ev.Stop())
    assert r.state() == State.STOPPED
    assert r(ev.Timer("gpu")) == [] and r(ev.GpuFree()) == []


# ------------------------------------------------------------------ liveness


def test_probe_flaps_never_restart_but_failures_in_a_row_do() -> None:
    r = Replay(Rules(failures=3, interval=10.0))
    r.up()
    now = 0.0
    for _ in range(20):  # fail, fail, pass: never three in a row
        for ok in (False, False, True):
            now += 10.0
            assert r(ev.Timer("health"), now) == [ev.Probe()]
            cmds = r(ev.Probed(ok, "HTTP 200" if ok else "HTTP 503", 0.01), now)
            assert timer(cmds, "health") == 10.0
            assert r.state() == (State.READY if ok else State.UNHEALTHY)
    assert r.life.detail == "pid 100"
    r(ev.Probed(False, "HTTP 503"), now + 10)
    assert r.life.detail == "1 probe(s) failed: HTTP 503"
    r(ev.Probed(False, "no answer within 5s"), now + 20)
    cmds = r(ev.Probed(False, "no answer within 5s"), now + 30)
    why = "unhealthy: 3 probes failed in a row (last: no answer within 5s)"
    assert cmds[0] == ev.Note(why, 30) and r.state() == State.STOPPING
    assert r.notes()[-3:-1] == [
        "probe failed (1/3): HTTP 503",
        "probe failed (2/3): no answer within 5s",
    ]
    r(ev.TreeStopped(), now + 31)
    assert r.life.detail.startswith(why + "; restart 1/5")


def test_deep_probe_failures_add_up_between_passing_health_probes() -> None:
    """Default ratios: /health every 10 s, a deep probe every 60 s, 3 failures."""
    r = Replay(Rules(deep_probe=True))
    r.up(0.0)
    now, deep_at = 0.0, []
    while r.state() != State.STOPPING:
        now += 10.0
        r(ev.Timer("health"), now)
        cmds = r(ev.Probed(True, "HTTP 200", 0.01), now)
        if ev.Probe(deep=True) in cmds:
            deep_at.append(now)
            r(ev.Probed(False, "no answer within 5s", deep=True), now)
        assert now < 1000
    # Due after 60 s, then repeated at every check while its streak runs.
    assert deep_at == [60.0, 70.0, 80.0]
    assert r.life.ending == ev.Ending(
        True,
        "hung: 3 deep probes (1-token completions) failed in a row while /health passed "
        "(last: no answer within 5s)",
    )
    assert "deep probe failed (2/3): no answer within 5s" in r.notes()


def test_a_good_deep_probe_ends_its_streak_and_health_keeps_its_own() -> None:
    r = Replay(Rules(deep_probe=True, deep_interval=60.0))
    r.up(0.0)
    r(ev.Probed(True, "HTTP 200"), 60.0)
    r(ev.Probed(False, "HTTP 500", deep=True), 60.0)
    assert (r.state(), r.life.deep_misses) == (State.UNHEALTHY, 1)
    assert r.life.detail == "1 probe(s) failed: HTTP 500"
    r(ev.Probed(False, "HTTP 503"), 70.0)  # /health fails: no deep probe meanwhile
    assert (r.life.misses, r.life.deep_misses) == (1, 1)
    assert r(ev.Probed(True, "HTTP 200"), 80.0) == [ev.Probe(deep=True)]
    r(ev.Probed(True, "ok", deep=True), 80.0)
    assert (r.state(), r.life.misses, r.life.deep_misses) == (State.READY, 0, 0)
    cmds = r(ev.Probed(True, "HTTP 200"), 90.0)
    assert ev.Probe(deep=True) not in cmds, "the next deep probe is due 60 s after the last"


# ------------------------------------------------------------------ adoption


def test_an_adopted_server_is_watched_and_probed_never_spawned() -> None:
    r = Replay()
    cmds = r(ev.Adopted(4242), 10.0)
    assert ev.WatchExit() in cmds and ev.AwaitReady() in cmds
    assert not any(isinstance(c, ev.Spawn | ev.Prepare | ev.CheckPredecessors) for c in cmds)
    assert r.life.pid == 4242 and r.state() == State.STARTING
    r(ev.PortReady(0.01), 10.2)
    assert r.state() == State.READY and r.life.detail == "pid 4242"
    assert "adopted pid 4242" in r.notes()[0]


def test_an_adopted_server_keeps_its_restart_budget() -> None:
    """The restarts of the daemon before count: a crash loop is not forgiven by a
    daemon restart."""
    rules = Rules(restart=Restart(max_restarts=2, window=600.0))
    r = Replay(rules, Life(restarts=(1.0, 2.0), total=7, streak=2))
    r(ev.Adopted(9), 3.0)
    r(ev.PortReady(0.01), 3.1)
    r.crash(4.0)
    assert r.state() == State.FAILED and "gave up after 2 restarts" in r.life.reason
    assert r.life.total == 7


def test_an_adopted_server_that_exits_is_restarted_as_any_other() -> None:
    r = Replay(Rules())
    r(ev.Adopted(9), 0.0)
    r(ev.PortReady(0.01), 0.1)
    cmds = r.crash(5.0, code=-9)
    assert r.state() == State.BACKOFF and r.life.last_exit == "killed by SIGKILL"
    assert timer(cmds, "backoff") > 0


def test_adoption_acts_only_on_a_server_with_no_life_yet() -> None:
    for state in State:
        if state != State.STOPPED:
            life = life_in(state)
            assert step(life, ev.Adopted(5), 0.0, Rules(), NoJitter()) == (life, [])


def test_an_adopted_server_that_was_ready_gets_a_live_servers_patience() -> None:
    """Hung while no daemon ran: restarted after `failures` health intervals, not
    after the whole startup_timeout."""
    rules = Rules(interval=2.0, failures=3, startup_timeout=1200.0)
    r = Replay(rules)
    cmds = r(ev.Adopted(9, age=3600.0, was_ready=True), 0.0)
    assert timer(cmds, "startup") == 6.0
    cmds = r(ev.Timer("startup"), 6.0)
    assert ev.StopTree(rules.stop_timeout) in cmds
    assert "adopted, but not ready again within 6s" in r.life.last_exit


def test_an_adopted_server_still_loading_gets_what_is_left_of_its_startup_timeout() -> None:
    rules = Rules(interval=2.0, failures=3, startup_timeout=1200.0)
    r = Replay(rules)
    assert timer(r(ev.Adopted(9, age=1000.0), 0.0), "startup") == 200.0
    r(ev.PortReady(0.01), 50.0)
    assert r.state() == State.READY and "ready after 1050.0s" in r.notes()[-1]
    late = Replay(rules)
    assert timer(late(ev.Adopted(9, age=5000.0), 0.0), "startup") == 6.0
    late(ev.Timer("startup"), 6.0)
    assert "not ready within 1200s (health.startup_timeout)" in late.life.last_exit


def test_an_adopted_server_that_was_ready_does_not_pull_and_preload_again() -> None:
    """Its models were pulled and loaded for this very process (an offline host could
    not pull again); the liveness probe loads one again if a runner died."""
    rules = Rules(post_start=True)
    adopted = Replay(rules)
    adopted(ev.Adopted(9, age=60.0, was_ready=True), 0.0)
    assert ev.RunPostStart() not in adopted(ev.PortReady(0.01), 0.1)
    assert adopted.state() == State.READY
    loading = Replay(rules)
    loading(ev.Adopted(9, age=60.0), 0.0)
    assert loading(ev.PortReady(0.01), 0.1) == [ev.RunPostStart()]
    adopted.crash(5.0)  # a fresh process of its own: the steps run again
    adopted(ev.Timer("backoff"), 10.0)
    adopted(ev.PredecessorsDone(), 10.0)
    adopted(ev.Prepared(), 10.0)
    adopted(ev.GpuFree(), 10.0)
    adopted(ev.Started(10), 10.0)
    assert adopted(ev.PortReady(0.01), 10.1) == [ev.RunPostStart()]
