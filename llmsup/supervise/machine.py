"""The life of one server as a pure function: `step(life, event, now, rules, rand)`
returns the next `Life` and the commands to carry out. No clock, no I/O: `now`
is passed in (monotonic seconds), randomness (backoff jitter) through `rand`.
The events, the commands and `Life` are plain data in `llmsup.supervise.events`.

    STOPPED/FAILED --start--> STARTING --busy predecessor--> WAITING --done--> STARTING
    STOPPED --adopted (a process a daemon before us started)--> STARTING --ready--> READY
    STARTING --GPU short--> WAITING_GPU --free--> STARTING (spawn) --answers--> LOADING
    STARTING/LOADING --ready--> READY <--probes--> UNHEALTHY
    a process that ends, or is to be ended --> STOPPING --tree gone--> BACKOFF/STOPPED/FAILED
    BACKOFF --timer--> STARTING ...   too many restarts within the window --> FAILED
    any --restart--> STOPPING (restarting) --tree gone--> STARTING, restarts forgotten;
        with no process yet, STARTING at once; from STOPPED/FAILED, a start

`TABLE` lists every (state, event) pair that does something; any other pair is
ignored (a probe result that arrives after its server was stopped, say).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace

from llmsup import manifest
from llmsup.state import State, describe_exit
from llmsup.supervise.events import (
    Abandon,
    Adopted,
    Answering,
    AwaitReady,
    CancelTimer,
    CheckGpu,
    CheckPredecessors,
    Command,
    Ending,
    Event,
    Exited,
    GpuFree,
    GpuShort,
    Hint,
    LaunchFailed,
    Life,
    Note,
    Phase,
    PortReady,
    PostStartDone,
    PostStartFailed,
    PredecessorsBusy,
    PredecessorsDone,
    Prepare,
    Prepared,
    Probe,
    Probed,
    Restart,
    RunPostStart,
    SetTimer,
    Spawn,
    Start,
    Started,
    Stop,
    StopTree,
    Timer,
    TreeStopped,
    WatchExit,
)

# ------------------------------------------------------------------ rules


@dataclass(frozen=True)
class Rules:
    """A server's settings, as the manifest resolves them."""

    restart: manifest.Restart = field(default_factory=manifest.Restart)
    failures: int = 3  # failed probes in a row = unhealthy (health.failures)
    interval: float = 10.0  # between liveness probes
    startup_timeout: float = 1200.0
    deep_probe: bool = False
    deep_interval: float = 60.0
    gpu_wait: float = 300.0
    stop_timeout: float = 30.0
    post_start: bool = False  # steps after the port answers (Ollama: pull, preload)


GPU_RECHECK = 0.5  # seconds between looks at the GPUs' free memory while waiting


def backoff_delay(attempt: int, initial: float, cap: float, rand: random.Random) -> float:
    """Delay before restart number `attempt` (1-based): exponential, capped, with jitter.

    The jitter (up to 10 %) keeps servers that crashed together from restarting together.
    """
    base = min(cap, initial * 2 ** max(0, attempt - 1))
    return min(cap, base + rand.uniform(0, base * 0.1)) if base > 0 else 0.0


Result = tuple[Life, list[Command]]


def _cancel_all() -> list[Command]:
    return [CancelTimer(n) for n in ("startup", "health", "gpu", "backoff")]


def _start(life: Life, reset: bool) -> Result:
    if reset:
        life = replace(life, restarts=(), streak=0, reason="")
    life = replace(
        life,
        state=State.STARTING,
        detail="launching",
        fatal=False,
        ending=None,
        restarting=False,
        starts=life.starts + 1,
    )
    return life, [CheckPredecessors()]


def _restart(life: Life, rules: Rules) -> Result:
    """Start afresh, the restarts forgotten; a process is stopped first, as by a stop."""
    s = life.state
    if s in (State.STOPPED, State.FAILED):
        return _start(life, reset=True)
    note = Note("restarting (requested)")
    detail = f"restarting (pid {life.pid})" if life.pid is not None else "restarting"
    if s == State.STOPPING:
        if life.ending is None:  # a stop asked for wins; a restart under way takes this in
            return life, []
        return replace(life, ending=None, restarting=True, detail=detail), [note]
    if life.pid is not None:
        life, cmds = _end(life, None, rules)
        return replace(life, restarting=True, detail=detail), [note, *cmds]
    if life.spawning:  # its process is stopped once Started says which it is
        life = replace(life, state=State.STOPPING, ending=None, restarting=True, detail=detail)
        return life, [note]
    # No process yet: the checks and waits under way belong to the start before.
    life, cmds = _start(life, reset=True)
    return life, [note, *_cancel_all(), Abandon(), *cmds]


def _adopted(life: Life, ev: Adopted, now: float, rules: Rules) -> Result:
    """Its process runs on from a daemon before us: watch it, and probe it until it
    answers; its earlier restarts are kept. Not ready again within its limit, it is
    restarted: a server that was READY gets what a READY one would (`failures`
    liveness intervals), one still loading what is left of its startup_timeout."""
    live = rules.interval * rules.failures
    if ev.was_ready:
        limit = live
        why = (
            f"adopted, but not ready again within {limit:g}s "
            "(health.interval x health.failures; it was READY before)"
        )
    else:
        limit = max(rules.startup_timeout - ev.age, live)
        why = f"not ready within {rules.startup_timeout:g}s (health.startup_timeout)"
    life = replace(
        life,
        state=State.STARTING,
        detail=f"pid {ev.pid} (adopted)",
        pid=ev.pid,
        since=now if ev.was_ready else now - ev.age,  # "ready after": its load, if loading
        hint="",
        launched=True,
        fatal=False,
        starts=life.starts + 1,
        startup_limit=limit,
        startup_why=why,
        post_started=ev.was_ready,
    )
    note = Note(f"adopted pid {ev.pid}, still running from a daemon before this one")
    return life, [note, WatchExit(), SetTimer("startup", limit), AwaitReady()]


def _launch(life: Life) -> Result:
    """Predecessors done: the facts of the run before are forgotten."""
    life = replace(
        life,
        state=State.STARTING,
        detail="launching",
        reason="",
        progress="",
        latency=None,
        gpu_deadline=None,
    )
    return life, [Prepare()]


def _end(life: Life, ending: Ending | None, rules: Rules) -> Result:
    """Stop the running process; `ending` None: as asked."""
    life = replace(life, state=State.STOPPING, ending=ending, detail=f"pid {life.pid}")
    if ending is not None:
        life = replace(life, last_exit=ending.reason)
    return life, [*_cancel_all(), StopTree(rules.stop_timeout)]


def _fail_at_once(life: Life, reason: str) -> Result:
    """A launch that retrying cannot help: not found, port held, a secret unreadable."""
    life = replace(life, state=State.FAILED, detail=reason, reason=reason, fatal=True)
    return life, [Note(f"FAILED: {reason}; not restarted", logging.ERROR), *_cancel_all()]


def _after(life: Life, now: float, rules: Rules, rand: random.Random) -> Result:
    """The process tree is gone: restart, stay down, or give up."""
    life = replace(life, pid=None, spawning=False)
    ending, life = life.ending, replace(life, ending=None)
    if ending is None and life.restarting:
        return _start(life, reset=True)
    if ending is None:
        life = replace(life, state=State.STOPPED, detail="stopped")
        return life, [Note("stopped (requested)")]
    policy = rules.restart
    if policy.policy == "never" or (policy.policy == "on-failure" and not ending.failed):
        if ending.failed:
            life = replace(life, state=State.FAILED, detail=ending.reason, reason=ending.reason)
            return life, [Note(f"FAILED: {ending.reason}", logging.ERROR)]
        why = f"{ending.reason}; not restarted (restart policy {policy.policy})"
        return replace(life, state=State.STOPPED, detail=ending.reason), [Note(why)]
    times = tuple(t for t in life.restarts if now - t <= policy.window)
    if len(times) >= policy.max_restarts:
        reason = (
            f"{ending.reason}; gave up after {len(times)} restarts within "
            f"{policy.window:g}s (restart policy max_restarts={policy.max_restarts})"
        )
        life = replace(life, state=State.FAILED, detail=reason, reason=reason, restarts=times)
        return life, [Note(f"FAILED: {reason}", logging.ERROR)]
    times += (now,)
    streak = life.streak + 1
    delay = backoff_delay(streak, policy.backoff_initial, policy.backoff_max, rand)
    detail = f"{ending.reason}; restart {len(times)}/{policy.max_restarts} in {delay:.1f}s"
    life = replace(
        life,
        state=State.BACKOFF,
        detail=detail,
        restarts=times,
        streak=streak,
        total=life.total + 1,
    )
    return life, [Note(detail, logging.WARNING), SetTimer("backoff", delay)]


def _probed(life: Life, ev: Probed, now: float, rules: Rules) -> Result:
    """A liveness probe of a READY/UNHEALTHY server.

    /health and deep-probe failures are counted apart: a passing /health says
    nothing about a hung engine, so it must not wipe out the deep probe's misses.
    A passing deep probe ends the deep streak. While that streak runs, the deep
    probe is repeated at every check rather than after `deep_interval`."""
    cmds: list[Command] = []
    if not ev.deep:
        misses = 0 if ev.ok else life.misses + 1
        life = replace(life, misses=misses, last_detail=ev.detail)
        if misses >= rules.failures:
            why = f"unhealthy: {misses} probes failed in a row (last: {ev.detail})"
            if life.hint:
                why += f" ({life.hint})"
            ended = _end(life, Ending(True, why), rules)
            return ended[0], [Note(why, logging.WARNING), *ended[1]]
        if not ev.ok:
            cmds.append(Note(f"probe failed ({misses}/{rules.failures}): {ev.detail}"))
        else:
            life = replace(life, latency=ev.latency)
            due = life.deep_misses > 0 or now - life.last_deep >= rules.deep_interval
            if rules.deep_probe and due:
                return replace(life, last_deep=now), [Probe(deep=True)]
    else:
        deep = 0 if ev.ok else life.deep_misses + 1
        life = replace(life, deep_misses=deep)
        if deep >= rules.failures:
            why = (
                f"hung: {deep} deep probes (1-token completions) failed "
                f"in a row while /health passed (last: {ev.detail})"
            )
            ended = _end(life, Ending(True, why), rules)
            return ended[0], [Note(why, logging.WARNING), *ended[1]]
        if not ev.ok:
            cmds.append(Note(f"deep probe failed ({deep}/{rules.failures}): {ev.detail}"))
            life = replace(life, last_detail=ev.detail)
    if life.misses == 0 and life.deep_misses == 0:
        life = replace(life, state=State.READY, detail=f"pid {life.pid}")
    else:
        n = max(life.misses, life.deep_misses)
        life = replace(
            life, state=State.UNHEALTHY, detail=f"{n} probe(s) failed: {life.last_detail}"
        )
    return life, [*cmds, SetTimer("health", rules.interval)]


def _ready(life: Life, now: float, rules: Rules) -> Result:
    life = replace(
        life,
        state=State.READY,
        detail=f"pid {life.pid}",
        streak=0,
        progress="",
        misses=0,
        deep_misses=0,
        last_deep=now,
        startup_limit=None,
        startup_why="",
    )
    note = Note(f"ready after {now - life.since:.1f}s (pid {life.pid})")
    return life, [CancelTimer("startup"), note, SetTimer("health", rules.interval)]


RUNNING = (State.STARTING, State.LOADING, State.READY, State.UNHEALTHY)
LAUNCHING = (State.STARTING, State.WAITING, State.WAITING_GPU, State.BACKOFF)
STARTUP = (State.STARTING, State.LOADING)
LIVE = (State.READY, State.UNHEALTHY)

# (event type, the states in which it acts): every transition `step` makes. In
# STOPPING, Stop and Restart act on an ending not asked for (a crash): a Stop asked
# for wins over a Restart under way, and a second Restart is taken into the first.
TABLE: dict[type, tuple[State, ...]] = {
    Start: (State.STOPPED, State.FAILED),
    Adopted: (State.STOPPED,),
    Stop: (State.WAITING, State.WAITING_GPU, State.BACKOFF, *RUNNING, State.STOPPING),
    Restart: tuple(State),
    PredecessorsBusy: (State.STARTING, State.WAITING, State.BACKOFF),
    PredecessorsDone: (State.STARTING, State.WAITING, State.BACKOFF),
    Prepared: (State.STARTING,),
    LaunchFailed: (State.STARTING, State.STOPPING),
    GpuShort: (State.STARTING, State.WAITING_GPU),
    GpuFree: (State.STARTING, State.WAITING_GPU),
    Started: (State.STARTING, State.WAITING_GPU, State.STOPPING),
    Answering: (State.STARTING,),
    PortReady: STARTUP,
    PostStartDone: STARTUP,
    PostStartFailed: STARTUP,
    Probed: LIVE,
    Phase: RUNNING,
    Hint: RUNNING,
    Exited: RUNNING,
    TreeStopped: (State.STOPPING,),
    Timer: (State.BACKOFF, State.WAITING_GPU, *RUNNING),
}


def step(life: Life, ev: Event, now: float, rules: Rules, rand: random.Random) -> Result:
    """The next life of a server after `ev`, and what to do about it."""
    if life.state not in TABLE[type(ev)]:
        return life, []
    s = life.state
    match ev:
        case Start(reset=reset):
            return _start(life, reset)
        case Adopted():
            return _adopted(life, ev, now, rules)
        case Stop():
            if s == State.STOPPING:  # a stop asked for wins over any restart under way
                detail = f"pid {life.pid}" if life.pid is not None else "stopping"
                return replace(life, ending=None, restarting=False, detail=detail), []
            if life.pid is not None:
                return _end(life, None, rules)
            if life.spawning:  # its process is stopped once Started says which it is
                return replace(life, state=State.STOPPING, detail="stopping", ending=None), []
            life = replace(life, state=State.STOPPED, detail="stopped")
            return life, [Note("stopped (requested)"), *_cancel_all()]
        case Restart():
            return _restart(life, rules)
        case PredecessorsBusy(names=names):
            return replace(
                life, state=State.WAITING, detail=f"after {', '.join(names)} (shared GPU)"
            ), []
        case PredecessorsDone():
            return _launch(life)
        case Prepared():
            return life, [CheckGpu()]
        case LaunchFailed(reason=reason, retry=retry):
            life = replace(life, spawning=False)
            if s == State.STOPPING and life.restarting:
                return _start(life, reset=True)
            if s == State.STOPPING:
                return replace(life, state=State.STOPPED, detail="stopped", ending=None), [
                    Note("stopped (requested)")
                ]
            if retry is None:
                return _fail_at_once(life, reason)
            life = replace(life, state=State.BACKOFF, detail=reason, shortages=life.shortages + 1)
            return life, [SetTimer("backoff", retry)]
        case GpuShort(message=msg):
            deadline = life.gpu_deadline if life.gpu_deadline is not None else now + rules.gpu_wait
            if now >= deadline:
                why = f"GPU memory still held after {rules.gpu_wait:g}s (health.gpu_wait): {msg}"
                return _fail_at_once(replace(life, launched=True), why)
            life = replace(
                life, state=State.WAITING_GPU, detail=msg, gpu_deadline=deadline, launched=True
            )
            return life, [SetTimer("gpu", GPU_RECHECK)]
        case GpuFree():
            life = replace(life, state=State.STARTING, spawning=True, progress="")
            return life, [CancelTimer("gpu"), Spawn()]
        case Started(pid=pid):
            life = replace(life, pid=pid, spawning=False, launched=True, shortages=0)
            if s == State.STOPPING:  # stopped while it was being spawned
                return life, [StopTree(rules.stop_timeout)]
            life = replace(
                life,
                state=State.STARTING,
                detail=f"pid {pid}",
                since=now,
                hint="",
                startup_limit=None,
                startup_why="",
                post_started=False,
            )
            return life, [SetTimer("startup", rules.startup_timeout), AwaitReady()]
        case Answering():
            return replace(life, state=State.LOADING, detail=f"pid {life.pid}"), []
        case PortReady(latency=latency):
            life = replace(life, latency=latency)
            if rules.post_start and not life.post_started:
                return replace(life, state=State.LOADING, detail=f"pid {life.pid}"), [
                    RunPostStart()
                ]
            return _ready(life, now, rules)
        case PostStartDone():
            return _ready(life, now, rules)
        case PostStartFailed(reason=reason):
            return _end(life, Ending(True, reason), rules)
        case Probed():
            return _probed(life, ev, now, rules)
        case Phase(text=text):
            state = State.LOADING if s == State.STARTING else s
            return replace(life, progress=text, state=state), []
        case Hint(text=text):
            return replace(life, hint=text), []
        case Exited(code=code):
            why = describe_exit(code) + (f" ({life.hint})" if life.hint else "")
            return _end(life, Ending(True, why), rules)  # a server is meant to run forever
        case TreeStopped():
            return _after(life, now, rules, rand)
        case Timer(name=name):
            if name == "backoff" and s == State.BACKOFF:
                return life, [CheckPredecessors()]
            if name == "gpu" and s == State.WAITING_GPU:
                return life, [CheckGpu()]
            if name == "startup" and s in STARTUP:
                why = life.startup_why or (
                    f"not ready within {rules.startup_timeout:g}s (health.startup_timeout)"
                )
                return _end(life, Ending(True, why), rules)
            if name == "health" and s in LIVE:
                return life, [Probe()]
            return life, []
    return life, []  # pragma: no cover - every event type is matched above
