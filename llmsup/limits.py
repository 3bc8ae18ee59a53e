"""Open files: the daemon's limit, what the gateway may take of it, and launches
that fail for want of descriptors.

Every connection, pipe and log file is a descriptor. Services get a soft limit of
1024 by default; a flood of idle connections to the gateway used to take them all,
and then a crashed server could not be respawned (its pipe and log need some) and
the control socket could not answer. So, as Go and nginx do: the soft limit is
raised to the hard one at start, the gateway takes connections only up to a cap
that keeps a reserve for supervision, and a launch that fails with EMFILE/ENFILE
is retried without being counted against the model.
"""

from __future__ import annotations

import errno
import resource
from dataclasses import dataclass

# Descriptors kept for everything but the gateway's clients: the control socket and
# its clients, health probes, the daemon's own files, and a margin.
RESERVE = 128
PER_SERVER = 4  # a server's output pipe, its log file, a probe, a spare
SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE})
SHORTAGE_BACKOFF_MAX = 30.0


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (what Go does at start);
    returns (before, after). Servers inherit it: vLLM and Ollama raise theirs anyway."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(soft_limit: int, servers: int) -> int:
    """The most client connections the gateway may hold: each may need a second
    descriptor upstream, and the reserve stays free for supervision."""
    spare = soft_limit - RESERVE - PER_SERVER * servers
    return max(1, spare // 2)


def shortage(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is the process or the system running out of
    file descriptors: no fault of the server being launched."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in SHORTAGE:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


@dataclass(frozen=True)
class Retry:
    delay: float
    detail: str  # for status


def launch_retry(e: BaseException, attempt: int) -> Retry | None:
    """What to do after a launch raised `e`, the `attempt`-th time in a row (1, 2...).

    Out of descriptors: retry after a delay doubling from 0.5 s up to 30 s, for ever,
    and the model's restart budget is not touched (a flood of connections must not
    make a healthy model FAILED). Anything else: None, the error is the model's."""
    if not shortage(e):
        return None
    delay = min(SHORTAGE_BACKOFF_MAX, 0.5 * 2.0 ** min(attempt - 1, 16))
    return Retry(delay, f"out of file descriptors ({e}); retry in {delay:.1f}s, not counted")
