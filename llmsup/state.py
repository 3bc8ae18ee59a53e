"""Per-server life: states, restart decisions, backoff. Pure: no clock, no I/O.

    STOPPED -> STARTING -> LOADING -> READY <-> UNHEALTHY
    any running state -> BACKOFF -> STARTING ...     (the restart policy allows)
    too many restarts within the window -> FAILED    (until `llmsup restart NAME`)
    stop requested -> STOPPING -> STOPPED

`now` is always passed in (monotonic seconds), randomness through `rand`.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field

from llmsup.manifest import Restart


class State(str, enum.Enum):
    STOPPED = "STOPPED"
    WAITING = "WAITING"  # for a server it starts after (shared GPU)
    WAITING_GPU = "WAITING_GPU"  # for free memory on its GPUs
    STARTING = "STARTING"  # process spawned, port not answering yet
    LOADING = "LOADING"  # answering, pulling or loading the model
    READY = "READY"
    UNHEALTHY = "UNHEALTHY"  # probes failing, not yet enough to restart
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    FAILED = "FAILED"

    @property
    def running(self) -> bool:
        return self in (State.STARTING, State.LOADING, State.READY, State.UNHEALTHY)


def backoff_delay(attempt: int, initial: float, cap: float, rand: random.Random) -> float:
    """Delay before restart number `attempt` (1-based): exponential, capped, with jitter.

    The jitter (up to 10 %) keeps servers that crashed together from restarting together.
    """
    base = min(cap, initial * 2 ** max(0, attempt - 1))
    return min(cap, base + rand.uniform(0, base * 0.1)) if base > 0 else 0.0


@dataclass(frozen=True)
class Respawn:
    """Start again after `delay` seconds."""

    delay: float


@dataclass(frozen=True)
class Fail:
    reason: str


@dataclass(frozen=True)
class Stay:
    """Do not restart: the process ended as its policy allows."""

    reason: str


Decision = Respawn | Fail | Stay


@dataclass
class RestartTracker:
    """Counts restarts inside a sliding window and the consecutive-failure streak."""

    times: deque[float] = field(default_factory=deque)
    streak: int = 0  # failures since the server was last READY
    total: int = 0

    def ready(self) -> None:
        self.streak = 0

    def decide(
        self,
        policy: Restart,
        now: float,
        failed: bool,
        reason: str,
        rand: random.Random,
    ) -> Decision:
        """What to do after a server ended (`failed`: crash, unhealthy, start timeout)."""
        if policy.policy == "never" or (policy.policy == "on-failure" and not failed):
            return Fail(reason) if failed else Stay(reason)
        while self.times and now - self.times[0] > policy.window:
            self.times.popleft()
        if len(self.times) >= policy.max_restarts:
            return Fail(
                f"{reason}; gave up after {len(self.times)} restarts within "
                f"{policy.window:g}s (restart policy max_restarts={policy.max_restarts})"
            )
        self.times.append(now)
        self.streak += 1
        self.total += 1
        return Respawn(backoff_delay(self.streak, policy.backoff_initial, policy.backoff_max, rand))

    def reset(self) -> None:
        self.times.clear()
        self.streak = 0


@dataclass
class Liveness:
    """Failed liveness probes of a READY server, counted per kind.

    /health failures and deep-probe (1-token completion) failures are counted
    apart: a passing /health says nothing about a hung engine, so it must not
    wipe out the deep probe's failures (with deep probes minutes apart and
    /health every few seconds, they would never add up). A passing deep probe
    ends the deep streak: the engine answered, the earlier misses were passing
    trouble. While the deep streak runs, the deep probe is repeated at every
    check rather than after `deep_interval`, to confirm or clear it soon.
    """

    threshold: int
    misses: int = 0  # /health in a row
    deep_misses: int = 0  # deep probes in a row

    def record(self, ok: bool) -> bool:
        """Record one /health probe; True when the server must be restarted."""
        self.misses = 0 if ok else self.misses + 1
        return self.misses >= self.threshold

    def record_deep(self, ok: bool) -> bool:
        """Record one deep probe; True when the server must be restarted."""
        self.deep_misses = 0 if ok else self.deep_misses + 1
        return self.deep_misses >= self.threshold

    def deep_due(self, since_last: float, deep_interval: float) -> bool:
        return self.deep_misses > 0 or since_last >= deep_interval

    @property
    def healthy(self) -> bool:
        return self.misses == 0 and self.deep_misses == 0


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


# vLLM's load-phase log lines (CPU and GPU builds), and how far along each one is.
# On CPU only "Starting to load model", "Loading weights took", "init engine" and
# the last two appear; the others are the GPU path's.
VLLM_PHASES: tuple[tuple[str, str, int], ...] = (
    ("Starting to load model", "loading weights", 10),
    ("Loading weights took", "weights loaded", 40),
    ("Model loading took", "model loaded", 50),
    ("torch.compile took", "compiled", 65),
    ("Graph capturing finished", "graphs captured", 80),
    ("init engine (profile, create kv cache, warmup model) took", "engine ready", 90),
    ("Starting vLLM server on", "starting API server", 95),
    ("Application startup complete.", "API server started", 99),
)
# uvicorn's last line before the port accepts (about 10 ms later in vLLM 0.32);
# "Starting vLLM server on" comes half a second earlier.
LISTENING_SOON = "Application startup complete."


def vllm_phase(line: str) -> tuple[str, int] | None:
    for marker, phase, percent in VLLM_PHASES:
        if marker in line:
            return phase, percent
    return None


def listening_soon(line: str) -> bool:
    """The server printed its last line before it accepts connections: probe now."""
    return LISTENING_SOON in line


def exit_hint(backend: str, line: str) -> str | None:
    """What a server's log line says about its coming exit, if anything.

    vLLM exits with code 0 when its EngineCore dies: the code alone hides it."""
    if backend == "vllm" and (
        ("Engine core proc" in line and "died unexpectedly" in line) or "EngineDeadError" in line
    ):
        return "EngineCore died"
    return None
