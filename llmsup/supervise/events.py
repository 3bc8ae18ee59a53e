"""What the supervision machine (`machine.step`) takes and gives: the events that
happen to a server, the commands that carry out its decisions, and `Life`, the
state it keeps between them. Plain frozen data, no behaviour.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llmsup.state import State

# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class Start:
    reset: bool = False  # forget earlier restarts (`llmsup start`)


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Adopted:
    """A server a daemon before this one started is still running, and is ours:
    supervise it from where it is (probe it, watch its exit), never restart it."""

    pid: int
    age: float = 0.0  # seconds since it was launched
    was_ready: bool = False  # READY (or UNHEALTHY) when the daemon before us last saw it


@dataclass(frozen=True)
class Restart:
    """Asked for (`llmsup restart`): stop the process, if any, and start afresh with
    the earlier restarts forgotten, without resting in STOPPED."""


@dataclass(frozen=True)
class PredecessorsBusy:
    names: tuple[str, ...]  # servers sharing a GPU that start before this one


@dataclass(frozen=True)
class PredecessorsDone:
    pass


@dataclass(frozen=True)
class Prepared:
    """Executable found, environment read, port free: ready to check the GPUs."""


@dataclass(frozen=True)
class LaunchFailed:
    reason: str
    retry: float | None = None  # out of descriptors: retry after this, not counted


@dataclass(frozen=True)
class GpuShort:
    message: str


@dataclass(frozen=True)
class GpuFree:
    pass


@dataclass(frozen=True)
class Started:
    pid: int


@dataclass(frozen=True)
class Answering:
    """The port answers, not yet 200: the model is loading."""


@dataclass(frozen=True)
class PortReady:
    latency: float


@dataclass(frozen=True)
class PostStartDone:
    pass


@dataclass(frozen=True)
class PostStartFailed:
    reason: str


@dataclass(frozen=True)
class Probed:
    ok: bool
    detail: str
    latency: float = 0.0
    deep: bool = False  # a 1-token completion, not /health


@dataclass(frozen=True)
class Phase:
    """A log line says how far loading has come (vLLM)."""

    text: str


@dataclass(frozen=True)
class Hint:
    """A log line says why the process is about to exit (vLLM's EngineCore died)."""

    text: str


@dataclass(frozen=True)
class Exited:
    code: int  # negative: killed by that signal


@dataclass(frozen=True)
class TreeStopped:
    """No process of the launch is left."""


@dataclass(frozen=True)
class Timer:
    name: str


Event = (
    Start
    | Stop
    | Adopted
    | Restart
    | PredecessorsBusy
    | PredecessorsDone
    | Prepared
    | LaunchFailed
    | GpuShort
    | GpuFree
    | Started
    | Answering
    | PortReady
    | PostStartDone
    | PostStartFailed
    | Probed
    | Phase
    | Hint
    | Exited
    | TreeStopped
    | Timer
)

# ------------------------------------------------------------------ commands


@dataclass(frozen=True)
class CheckPredecessors:
    """Report PredecessorsBusy while any is starting, then PredecessorsDone."""


@dataclass(frozen=True)
class Prepare:
    """Read secrets, find the executable, free the port of our leftovers; report
    Prepared or LaunchFailed."""


@dataclass(frozen=True)
class CheckGpu:
    """Report GpuFree or GpuShort."""


@dataclass(frozen=True)
class Spawn:
    """Start the process; report Started or LaunchFailed, then its lines and Exited."""


@dataclass(frozen=True)
class WatchExit:
    """Report Exited once the (adopted) process exits; a Spawn watches its own."""


@dataclass(frozen=True)
class AwaitReady:
    """Probe the readiness path until it answers 200 (PortReady), saying Answering
    when it answers anything else."""


@dataclass(frozen=True)
class RunPostStart:
    """The backend's steps after the port answers; report PostStartDone or -Failed."""


@dataclass(frozen=True)
class Probe:
    deep: bool = False


@dataclass(frozen=True)
class StopTree:
    """SIGTERM to every member, `grace`, then kill; report TreeStopped."""

    grace: float


@dataclass(frozen=True)
class Abandon:
    """Cancel the checks and waits under way (a restart before any process): what
    they report, even if already reported, is no longer fed to the machine."""


@dataclass(frozen=True)
class SetTimer:
    name: str
    delay: float


@dataclass(frozen=True)
class CancelTimer:
    name: str


@dataclass(frozen=True)
class Note:
    """A line about the server's life, in the daemon's log and the server's."""

    text: str
    level: int = logging.INFO


Command = (
    CheckPredecessors
    | Prepare
    | CheckGpu
    | Spawn
    | WatchExit
    | AwaitReady
    | RunPostStart
    | Probe
    | StopTree
    | Abandon
    | SetTimer
    | CancelTimer
    | Note
)

# ------------------------------------------------------------------ state


@dataclass(frozen=True)
class Ending:
    """Why the current process is being stopped (None in `Life.ending`: asked to)."""

    failed: bool
    reason: str


@dataclass(frozen=True)
class Life:
    state: State = State.STOPPED
    detail: str = ""
    reason: str = ""  # why it is FAILED, or the last failure
    last_exit: str = ""
    progress: str = ""
    latency: float | None = None
    pid: int | None = None
    spawning: bool = False  # a Spawn is under way: its process may yet appear
    since: float = 0.0  # when the process was spawned
    # Its startup's limit in seconds, and why, while STARTING/LOADING: the manifest's
    # startup_timeout, or less for an adopted server (see `machine._adopted`).
    startup_limit: float | None = None
    startup_why: str = ""
    # Its post-start steps (Ollama: pull, preload) ran for this process already: an
    # adopted server that was READY (its liveness probe loads a model again if needed).
    post_started: bool = False
    hint: str = ""  # what the log said about a coming exit
    ending: Ending | None = None  # while STOPPING
    restarting: bool = False  # while STOPPING: start afresh once the tree is gone
    starts: int = 0  # starts and restarts begun (a restart's caller waits for the next)
    fatal: bool = False  # FAILED for a reason retrying cannot help
    launched: bool = False  # a process was spawned, or a wait for GPUs began
    gpu_deadline: float | None = None
    # Restarts: their times within the window, failures since READY, all of them.
    restarts: tuple[float, ...] = ()
    streak: int = 0
    total: int = 0
    shortages: int = 0  # launches in a row that found no descriptor free
    # Liveness of a READY server: /health and deep probes failed in a row, apart.
    misses: int = 0
    deep_misses: int = 0
    last_deep: float = 0.0
    last_detail: str = ""
