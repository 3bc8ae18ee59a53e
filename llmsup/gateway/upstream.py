"""A remote model's upstreams, pure: each one's health and how it changes, how a
probe's answer is judged, which upstream a request goes to, and the model's state.

Nothing here sleeps, reads a clock or does I/O: times are passed in. The effects
(probing, routing, reporting) are `llmsup.gateway.remote`.

An upstream is UNKNOWN until its first probe answers, then UP or DOWN:

    UNKNOWN --probe ok--> UP      UNKNOWN --probe fails--> DOWN (it was never up)
    UP --`failures` failed probes in a row--> DOWN
    UP --a request finds it refused, or refusing our key--> DOWN (at once: proof, not a symptom)
    DOWN --probe ok--> UP (routed to again within one probe interval)

A model is READY while at least one upstream is UP, STARTING while none is UP and
some is still UNKNOWN, else UNHEALTHY.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmsup.state import State

UP, DOWN, UNKNOWN = "up", "down", "unknown"


@dataclass(frozen=True)
class Health:
    """One upstream's health, as probes and requests found it."""

    state: str = UNKNOWN  # UP | DOWN | UNKNOWN
    failures: int = 0  # failed probes (and requests) in a row
    error: str = ""  # the last failure, kept after it recovers
    since: float = 0.0  # when it entered `state` (wall clock, for status)
    error_at: float | None = None  # when `error` happened

    @property
    def up(self) -> bool:
        return self.state == UP


def probed(h: Health, error: str | None, limit: int, now: float) -> Health:
    """After a probe that passed (`error` None) or failed."""
    if error is None:
        if h.state == UP and h.failures == 0:
            return h
        return Health(UP, 0, h.error, h.since if h.state == UP else now, h.error_at)
    failures = h.failures + 1
    state = UP if h.state == UP and failures < limit else DOWN
    return Health(state, failures, error, h.since if state == h.state else now, now)


class Failure(enum.Enum):
    """What went wrong with a request to an upstream before any byte reached the client."""

    REFUSED = "refused"  # no connection: nothing listens there, or it is unreachable
    RESET = "reset"  # the connection closed before an answer began
    KEY = "key"  # it answered 401: our api_key is not its key
    UNAVAILABLE = "unavailable"  # it answered 503 (an llmsup upstream whose model is not ready)
    TIMEOUT = "timeout"  # no answer (or no first byte) in time
    GONE = "gone"  # probes found it down while the request waited for its answer

    @property
    def counted(self) -> bool:
        """It says something of the upstream that its probes did not already."""
        return self is not Failure.GONE

    @property
    def certain(self) -> bool:
        """It shows the upstream cannot serve now: DOWN at once."""
        return self in (Failure.REFUSED, Failure.KEY)

    @property
    def retried(self) -> bool:
        """Nothing was served: the request may go to another upstream (once)."""
        return self is not Failure.TIMEOUT


def failed(h: Health, failure: Failure, error: str, limit: int, now: float) -> Health:
    """After a request that failed on this upstream: a certain failure makes it DOWN
    at once, another counts as a failed probe."""
    if not failure.certain:
        return probed(h, error, limit, now)
    return Health(DOWN, max(h.failures + 1, limit), error, h.since if h.state == DOWN else now, now)


@dataclass(frozen=True)
class Candidate:
    """An upstream as a request sees it."""

    index: int
    up: bool
    in_flight: int
    last_pick: int  # when it was last chosen (a counter; 0: never)


def choose(candidates: Sequence[Candidate], avoid: Collection[int] = ()) -> int | None:
    """The UP upstream with the fewest requests in flight (ties: the one chosen least
    recently, so that one request at a time still spreads); None when none is UP."""
    usable = [c for c in candidates if c.up and c.index not in avoid]
    if not usable:
        return None
    return min(usable, key=lambda c: (c.in_flight, c.last_pick, c.index)).index


def model_state(healths: Sequence[Health]) -> State:
    if any(h.up for h in healths):
        return State.READY
    if any(h.state == UNKNOWN for h in healths):
        return State.STARTING
    return State.UNHEALTHY


# ----------------------------------------------------------------- probes


def judge(status: int, body: Any, names: Sequence[str]) -> str | None:
    """What is wrong with an upstream whose `GET /v1/models` answered `status` and
    `body` (parsed JSON, None if it was none), for a model served as `names`; None: it
    serves them. An llmsup upstream's card also says the model's state there."""
    if status == 401:
        return "refused our key (401): check api_key"
    if status != 200:
        return f"GET /v1/models answered {status}"
    data = body.get("data") if isinstance(body, Mapping) else None
    if not isinstance(data, list):
        return "GET /v1/models answered no model list"
    cards = {c["id"]: c for c in data if isinstance(c, Mapping) and isinstance(c.get("id"), str)}
    for name in names:
        if name not in cards:
            listed = ", ".join(sorted(cards)[:10]) or "none"
            return f"does not serve {name!r} (it lists: {listed})"
        info = cards[name].get("llmsup")
        if isinstance(info, Mapping) and (state := _not_serving(info)) is not None:
            return f"{name!r} is {state} there"
    return None


def _not_serving(info: Mapping[str, Any]) -> str | None:
    """The state of a model on an llmsup upstream, unless it serves requests: READY,
    or on demand and not FAILED (a request starts it there)."""
    state = str(info.get("state", ""))
    if state == State.READY.value or not state:
        return None
    if info.get("on_demand") is True and state != State.FAILED.value:
        return None
    return state


# ----------------------------------------------------------------- reports


@dataclass(frozen=True)
class UpstreamReport:
    """One upstream, as `status` and `/v1/models` show it."""

    url: str
    state: str
    error: str  # the last failure ("" if none)
    since: float  # wall clock: in `state` since
    error_at: float | None
    latency: float | None  # of its last probe that answered


@dataclass(frozen=True)
class RemoteReport:
    """A remote model and its upstreams (the gateway process tells the daemon)."""

    name: str
    state: State
    upstreams: tuple[UpstreamReport, ...]

    @property
    def detail(self) -> str:
        up = sum(u.state == UP for u in self.upstreams)
        return f"{up} of {len(self.upstreams)} upstreams up"

    @property
    def reason(self) -> str:
        """Why no upstream serves, when none does: each one's last error."""
        if self.state == State.READY:
            return ""
        return "; ".join(f"{u.url}: {u.error or u.state}" for u in self.upstreams)
