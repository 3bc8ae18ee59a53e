"""A server's life replayed through the pure machine: events in, state and
commands out, no processes, no clock (each event carries its own `now`)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from llmsup.manifest import Restart
from llmsup.state import State
from llmsup.supervise import machine as m
from llmsup.supervise.machine import Life, Rules, step


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
        self.commands: list[m.Command] = []
        self.rand: random.Random = NoJitter()

    def __call__(self, ev: m.Event, now: float = 0.0) -> list[m.Command]:
        self.life, cmds = step(self.life, ev, now, self.rules, self.rand)
        self.commands += cmds
        return cmds

    def up(self, now: float = 0.0, pid: int = 100, ready: bool = True) -> None:
        """From STOPPED (or BACKOFF's timer) to READY (or to a process that is starting)."""
        if self.state() == State.BACKOFF:
            assert self(m.Timer("backoff"), now) == [m.CheckPredecessors()]
        else:
            assert self(m.Start(), now) == [m.CheckPredecessors()]
        assert self(m.PredecessorsDone(), now) == [m.Prepare()]
        assert self(m.Prepared(), now) == [m.CheckGpu()]
        assert m.Spawn() in self(m.GpuFree(), now)
        assert m.AwaitReady() in self(m.Started(pid), now)
        if not ready:
            return
        self(m.PortReady(0.01), now)
        assert self.state() == State.READY, self.life

    def crash(self, now: float, code: int = 1) -> list[m.Command]:
        cmds = self(m.Exited(code), now)
        assert m.StopTree(self.rules.stop_timeout) in cmds
        assert self.state() == State.STOPPING
        return self(m.TreeStopped(), now)

    def state(self) -> State:
        return self.life.state

    def notes(self) -> list[str]:
        return [c.text for c in self.commands if isinstance(c, m.Note)]


def timer(cmds: list[m.Command], name: str) -> float:
    delays = [c.delay for c in cmds if isinstance(c, m.SetTimer) and c.name == name]
    assert len(delays) == 1, cmds
    return delays[0]


# ------------------------------------------------------------------ the table

# One event of each kind, and a life in each state, to walk the whole table.
SAMPLES: dict[type, m.Event] = {
    m.Start: m.Start(),
    m.Stop: m.Stop(),
    m.PredecessorsBusy: m.PredecessorsBusy(("a",)),
    m.PredecessorsDone: m.PredecessorsDone(),
    m.Prepared: m.Prepared(),
    m.LaunchFailed: m.LaunchFailed("no"),
    m.GpuShort: m.GpuShort("GPU 0 held"),
    m.GpuFree: m.GpuFree(),
    m.Started: m.Started(7),
    m.Answering: m.Answering(),
    m.PortReady: m.PortReady(0.1),
    m.PostStartDone: m.PostStartDone(),
    m.PostStartFailed: m.PostStartFailed("pull failed"),
    m.Probed: m.Probed(False, "HTTP 500"),
    m.Phase: m.Phase("loading weights (10%)"),
    m.Hint: m.Hint("EngineCore died"),
    m.Exited: m.Exited(1),
    m.TreeStopped: m.TreeStopped(),
    m.Timer: m.Timer("?"),  # named after the state below
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
    ending = m.Ending(True, "crashed") if state == State.STOPPING else None
    return Life(state=state, pid=1 if with_pid else None, ending=ending)


def test_every_event_acts_in_its_tables_states_and_nowhere_else() -> None:
    assert set(SAMPLES) == set(m.TABLE), "an event type without a sample or a table row"
    for kind, ev in SAMPLES.items():
        for state in State:
            life = life_in(state)
            if kind is m.Timer:
                ev = m.Timer(TIMER_OF.get(state, "backoff"))
            after, cmds = step(life, ev, 1.0, Rules(), NoJitter())
            acted = after != life or cmds != []
            assert acted == (state in m.TABLE[kind]), (kind.__name__, state)


def test_a_timer_of_another_state_does_nothing() -> None:
    for state, name in TIMER_OF.items():
        for other in {"backoff", "gpu", "startup", "health"} - {name}:
            life = life_in(state)
            assert step(life, m.Timer(other), 1.0, Rules(), NoJitter()) == (life, [])


# ------------------------------------------------------------------ histories


def test_a_start_goes_through_each_step_to_ready() -> None:
    r = Replay(Rules(interval=10.0, startup_timeout=60.0))
    r(m.Start(), 0.0)
    assert (r.state(), r.life.detail) == (State.STARTING, "launching")
    r(m.PredecessorsBusy(("a", "b")), 0.0)
    assert (r.state(), r.life.detail) == (State.WAITING, "after a, b (shared GPU)")
    assert r(m.PredecessorsDone(), 1.0) == [m.Prepare()]
    assert r(m.Prepared(), 1.0) == [m.CheckGpu()]
    assert r(m.GpuFree(), 1.0) == [m.CancelTimer("gpu"), m.Spawn()]
    cmds = r(m.Started(42), 1.0)
    assert cmds == [m.SetTimer("startup", 60.0), m.AwaitReady()]
    assert (r.state(), r.life.detail, r.life.launched) == (State.STARTING, "pid 42", True)
    r(m.Phase("loading weights (10%)"), 2.0)
    assert (r.state(), r.life.progress) == (State.LOADING, "loading weights (10%)")
    cmds = r(m.PortReady(0.02), 4.5)
    assert cmds[0] == m.CancelTimer("startup") and timer(cmds, "health") == 10.0
    assert (r.state(), r.life.detail, r.life.progress) == (State.READY, "pid 42", "")
    assert r.life.latency == 0.02
    assert r.notes() == ["ready after 3.5s (pid 42)"]


def test_a_port_that_answers_not_yet_200_means_loading() -> None:
    r = Replay()
    r(m.Start())
    r(m.PredecessorsDone())
    r(m.Prepared())
    r(m.GpuFree())
    r(m.Started(5))
    r(m.Answering())
    assert (r.state(), r.life.detail) == (State.LOADING, "pid 5")


def test_post_start_steps_come_before_ready_and_their_failure_restarts() -> None:
    r = Replay(Rules(post_start=True, restart=Restart(backoff_initial=1.0)))
    r(m.Start())
    r(m.PredecessorsDone())
    r(m.Prepared())
    r(m.GpuFree())
    r(m.Started(5))
    assert r(m.PortReady(0.01)) == [m.RunPostStart()]
    assert r.state() == State.LOADING
    r(m.Phase("pulling llama3 (40%)"))
    assert r.life.progress == "pulling llama3 (40%)"
    r(m.PostStartFailed("not in /api/ps after preload: llama3"))
    assert r.state() == State.STOPPING
    r(m.TreeStopped(), 1.0)
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
    r(m.Timer("backoff"), 1.0)
    r(m.PredecessorsDone(), 1.0)
    r(m.Prepared(), 1.0)
    r(m.GpuFree(), 1.0)
    r(m.Started(2), 1.0)
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
        life = replace(life_in(State.STOPPING), ending=m.Ending(False, "done"))
        rules = Rules(restart=Restart(policy=policy))
        after, cmds = step(life, m.TreeStopped(), 0.0, rules, NoJitter())
        assert (after.state, after.detail) == (State.STOPPED, "done")
        assert cmds == [m.Note(f"done; not restarted (restart policy {policy})")]


def test_an_engine_core_death_is_named_though_the_code_is_0() -> None:
    r = Replay()
    r.up()
    r(m.Hint("EngineCore died"))
    r.crash(1.0, code=0)
    assert r.life.last_exit == "exited with code 0 (EngineCore died)"
    r.up(10.0)
    r.crash(11.0, code=1)
    assert r.life.last_exit == "exited with code 1", "a hint lasts one run only"


def test_not_ready_in_time_is_a_failure() -> None:
    r = Replay(Rules(startup_timeout=30.0))
    r(m.Start())
    r(m.PredecessorsDone())
    r(m.Prepared())
    r(m.GpuFree())
    r(m.Started(3))
    r(m.Timer("startup"), 30.0)
    assert r.state() == State.STOPPING
    r(m.TreeStopped(), 31.0)
    assert r.life.detail.startswith("not ready within 30s (health.startup_timeout); restart 1/5")


# ------------------------------------------------------------------ stops


def test_stop_before_the_process_exists_stops_at_once() -> None:
    setups: list[list[m.Event]] = [[m.Start()], [m.Start(), m.PredecessorsBusy(("a",))]]
    for setup in setups:
        r = Replay()
        for ev in setup:
            r(ev)
        cmds = r(m.Stop())
        assert (r.state(), r.life.detail) == (State.STOPPED, "stopped")
        assert m.Note("stopped (requested)") in cmds
        assert r(m.PredecessorsDone()) == [] and r.state() == State.STOPPED


def test_stop_while_the_process_is_being_spawned_stops_it_once_it_exists() -> None:
    r = Replay(Rules(stop_timeout=7.0))
    r(m.Start())
    r(m.PredecessorsDone())
    r(m.Prepared())
    r(m.GpuFree())
    assert r(m.Stop()) == [] and r.state() == State.STOPPING, "no tree to stop yet"
    assert r(m.Started(9)) == [m.StopTree(7.0)]
    assert r.state() == State.STOPPING
    r(m.TreeStopped())
    assert (r.state(), r.life.pid) == (State.STOPPED, None)
    # The spawn failed instead: nothing to stop.
    r = Replay()
    r(m.Start())
    r(m.PredecessorsDone())
    r(m.Prepared())
    r(m.GpuFree())
    r(m.Stop())
    r(m.LaunchFailed("cannot start vllm: Permission denied"))
    assert (r.state(), r.life.fatal) == (State.STOPPED, False)


def test_stop_during_start_and_when_ready_stops_the_tree() -> None:
    for ready in (False, True):
        r = Replay(Rules(stop_timeout=5.0))
        if ready:
            r.up()
        else:
            r(m.Start())
            r(m.PredecessorsDone())
            r(m.Prepared())
            r(m.GpuFree())
            r(m.Started(4))
        cmds = r(m.Stop())
        assert cmds[-1] == m.StopTree(5.0)
        assert {m.CancelTimer("startup"), m.CancelTimer("health")} <= set(cmds)
        assert r(m.Probed(False, "HTTP 500")) == [], "a late probe result is ignored"
        assert r(m.Exited(-15)) == [] and r.state() == State.STOPPING
        assert r(m.TreeStopped()) == [m.Note("stopped (requested)")]
        assert (r.state(), r.life.detail) == (State.STOPPED, "stopped")


def test_stop_during_backoff_cancels_the_restart() -> None:
    r = Replay()
    r.up()
    r.crash(1.0)
    cmds = r(m.Stop(), 2.0)
    assert m.CancelTimer("backoff") in cmds
    assert (r.state(), r.life.detail) == (State.STOPPED, "stopped")
    assert r(m.Timer("backoff"), 6.0) == []


def test_stop_while_a_failed_process_is_being_stopped_wins() -> None:
    """A reload replaces a server that just crashed: the stop asked for is the
    last word, not the restart the crash would have led to."""
    r = Replay()
    r.up()
    r(m.Exited(1))
    assert r(m.Stop()) == [] and r.state() == State.STOPPING
    r(m.TreeStopped())
    assert (r.state(), r.life.detail) == (State.STOPPED, "stopped")
    assert r.life.total == 0


def test_a_start_after_failed_forgets_the_restarts_only_when_asked() -> None:
    r = Replay(Rules(restart=Restart(policy="always", max_restarts=1)))
    r.up(0.0)
    r.crash(0.0)
    r.up(1.0)
    r.crash(1.0)
    assert r.state() == State.FAILED
    r(m.Start(reset=False), 2.0)
    r(m.PredecessorsDone(), 2.0)
    assert r.life.restarts == (0.0,) and r.life.reason == ""
    r(m.Stop())
    r(m.Start(reset=True), 3.0)
    assert (r.state(), len(r.life.restarts), r.life.streak) == (State.STARTING, 0, 0)
    r(m.PredecessorsDone(), 3.0)
    r(m.Prepared(), 3.0)
    r(m.GpuFree(), 3.0)
    r(m.Started(8), 3.0)
    r(m.PortReady(0.1), 3.0)
    r.crash(4.0)
    assert r.state() == State.BACKOFF, "a fresh budget after `llmsup restart`"


# ------------------------------------------------------------------ launches


def test_a_fatal_launch_error_fails_at_once_and_says_why() -> None:
    r = Replay()
    r(m.Start())
    r(m.PredecessorsDone())
    cmds = r(m.LaunchFailed("port 8000 on 127.0.0.1 is held by nginx (pid 1)"))
    assert r.state() == State.FAILED and r.life.fatal and not r.life.launched
    assert cmds[0] == m.Note(
        "FAILED: port 8000 on 127.0.0.1 is held by nginx (pid 1); not restarted", 40
    )
    r(m.Start(reset=True))
    assert not r.life.fatal


def test_out_of_descriptors_retries_for_ever_without_counting() -> None:
    r = Replay(Rules(restart=Restart(max_restarts=1)))
    r(m.Start())
    for i in range(200):
        r(m.PredecessorsDone(), float(i))
        cmds = r(m.LaunchFailed("out of file descriptors; retry", retry=30.0), float(i))
        assert cmds == [m.SetTimer("backoff", 30.0)]
        assert r.state() == State.BACKOFF
        assert r(m.Timer("backoff"), float(i)) == [m.CheckPredecessors()]
    assert (r.life.shortages, r.life.total, r.life.restarts) == (200, 0, ())
    r(m.PredecessorsDone())
    r(m.Prepared())
    r(m.GpuFree())
    r(m.Started(3))
    assert r.life.shortages == 0


def test_gpu_wait_rechecks_until_free() -> None:
    r = Replay(Rules(gpu_wait=60.0))
    r(m.Start())
    r(m.PredecessorsDone())
    r(m.Prepared(), 0.0)
    cmds = r(m.GpuShort("GPU 0: 30 GiB held by pid 77"), 0.0)
    assert cmds == [m.SetTimer("gpu", m.GPU_RECHECK)]
    assert (r.state(), r.life.detail) == (State.WAITING_GPU, "GPU 0: 30 GiB held by pid 77")
    assert r.life.launched, "a wait for GPUs counts as a launch under way"
    assert r(m.Timer("gpu"), 0.5) == [m.CheckGpu()]
    r(m.GpuShort("GPU 0: 10 GiB held by pid 77"), 30.0)
    assert r.life.detail == "GPU 0: 10 GiB held by pid 77"
    assert r(m.GpuFree(), 30.5)[-1] == m.Spawn()
    assert r.state() == State.STARTING


def test_gpu_wait_gives_up_at_its_deadline_and_the_next_start_waits_anew() -> None:
    r = Replay(Rules(gpu_wait=60.0))
    r(m.Start())
    r(m.PredecessorsDone(), 100.0)
    r(m.Prepared(), 100.0)
    r(m.GpuShort("held"), 100.0)
    r(m.GpuShort("held"), 159.9)
    assert r.state() == State.WAITING_GPU
    r(m.GpuShort("held"), 160.0)
    assert (r.state(), r.life.fatal) == (State.FAILED, True)
    assert r.life.reason == "GPU memory still held after 60s (health.gpu_wait): held"
    r(m.Start(), 200.0)
    r(m.PredecessorsDone(), 200.0)
    r(m.Prepared(), 200.0)
    r(m.GpuShort("held"), 200.0)
    assert r.state() == State.WAITING_GPU


def test_stop_while_waiting_for_gpus() -> None:
    r = Replay()
    r(m.Start())
    r(m.PredecessorsDone())
    r(m.Prepared())
    r(m.GpuShort("held"))
    assert m.CancelTimer("gpu") in r(m.Stop())
    assert r.state() == State.STOPPED
    assert r(m.Timer("gpu")) == [] and r(m.GpuFree()) == []


# ------------------------------------------------------------------ liveness


def test_probe_flaps_never_restart_but_failures_in_a_row_do() -> None:
    r = Replay(Rules(failures=3, interval=10.0))
    r.up()
    now = 0.0
    for _ in range(20):  # fail, fail, pass: never three in a row
        for ok in (False, False, True):
            now += 10.0
            assert r(m.Timer("health"), now) == [m.Probe()]
            cmds = r(m.Probed(ok, "HTTP 200" if ok else "HTTP 503", 0.01), now)
            assert timer(cmds, "health") == 10.0
            assert r.state() == (State.READY if ok else State.UNHEALTHY)
    assert r.life.detail == "pid 100"
    r(m.Probed(False, "HTTP 503"), now + 10)
    assert r.life.detail == "1 probe(s) failed: HTTP 503"
    r(m.Probed(False, "no answer within 5s"), now + 20)
    cmds = r(m.Probed(False, "no answer within 5s"), now + 30)
    why = "unhealthy: 3 probes failed in a row (last: no answer within 5s)"
    assert cmds[0] == m.Note(why, 30) and r.state() == State.STOPPING
    assert r.notes()[-3:-1] == [
        "probe failed (1/3): HTTP 503",
        "probe failed (2/3): no answer within 5s",
    ]
    r(m.TreeStopped(), now + 31)
    assert r.life.detail.startswith(why + "; restart 1/5")


def test_deep_probe_failures_add_up_between_passing_health_probes() -> None:
    """Default ratios: /health every 10 s, a deep probe every 60 s, 3 failures."""
    r = Replay(Rules(deep_probe=True))
    r.up(0.0)
    now, deep_at = 0.0, []
    while r.state() != State.STOPPING:
        now += 10.0
        r(m.Timer("health"), now)
        cmds = r(m.Probed(True, "HTTP 200", 0.01), now)
        if m.Probe(deep=True) in cmds:
            deep_at.append(now)
            r(m.Probed(False, "no answer within 5s", deep=True), now)
        assert now < 1000
    # Due after 60 s, then repeated at every check while its streak runs.
    assert deep_at == [60.0, 70.0, 80.0]
    assert r.life.ending == m.Ending(
        True,
        "hung: 3 deep probes (1-token completions) failed in a row while /health passed "
        "(last: no answer within 5s)",
    )
    assert "deep probe failed (2/3): no answer within 5s" in r.notes()


def test_a_good_deep_probe_ends_its_streak_and_health_keeps_its_own() -> None:
    r = Replay(Rules(deep_probe=True, deep_interval=60.0))
    r.up(0.0)
    r(m.Probed(True, "HTTP 200"), 60.0)
    r(m.Probed(False, "HTTP 500", deep=True), 60.0)
    assert (r.state(), r.life.deep_misses) == (State.UNHEALTHY, 1)
    assert r.life.detail == "1 probe(s) failed: HTTP 500"
    r(m.Probed(False, "HTTP 503"), 70.0)  # /health fails: no deep probe meanwhile
    assert (r.life.misses, r.life.deep_misses) == (1, 1)
    assert r(m.Probed(True, "HTTP 200"), 80.0) == [m.Probe(deep=True)]
    r(m.Probed(True, "ok", deep=True), 80.0)
    assert (r.state(), r.life.misses, r.life.deep_misses) == (State.READY, 0, 0)
    cmds = r(m.Probed(True, "HTTP 200"), 90.0)
    assert m.Probe(deep=True) not in cmds, "the next deep probe is due 60 s after the last"
